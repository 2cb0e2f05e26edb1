"""`lora-ft push RUN_OR_MODEL_DIR --repo-id user/name [--private] [--revision main] [--dry-run --output DIR]`."""

from __future__ import annotations

import argparse
import json

HELP = "publish a run dir or a merged model to the Hugging Face Hub, with a generated model card"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("push", help=HELP, description=HELP,
                       epilog="The token comes from HF_TOKEN or `hf auth login`; it is never printed or written. "
                              "What is uploaded is exactly what --dry-run stages into --output.")
    p.add_argument("source", metavar="RUN_OR_MODEL_DIR", help="a `lora-ft train` run dir or a `lora-ft merge` output")
    p.add_argument("--repo-id", "--repo_id", dest="repo_id", required=True, help="user/name or org/name on the Hub")
    p.add_argument("--private", action="store_true", help="create the repo private (applies when the repo is created)")
    p.add_argument("--revision", default="main", help="branch to commit to; created from main if missing (default: main)")
    p.add_argument("--commit-message", "--commit_message", dest="commit_message", help="default: 'lora-ft push: ...'")
    p.add_argument("--base-model", "--base_model", dest="base_model",
                   help="Hub id of the base model, for runs trained from a local folder")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="stage into --output and stop: no token needed, nothing uploaded")
    p.add_argument("--output", help="folder to stage into (required with --dry-run; kept after a push)")
    p.add_argument("--endpoint", help="Hub endpoint (default: $HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output that is not a staged push")
    return p


def run(args, overrides: list[str]) -> int:
    import tempfile
    from pathlib import Path

    from ..errors import LoraFtError
    from ..hub import check_repo_id, get_token, require_token, resolve_endpoint, stage, upload

    if overrides:
        raise LoraFtError(f"push: unknown option(s) {' '.join(overrides)}; see `lora-ft push --help`")
    if args.dry_run and not args.output:
        raise LoraFtError("push: --dry-run stages into a folder; add --output DIR")
    check_repo_id(args.repo_id)
    token = get_token()
    if not args.dry_run:
        require_token(token)  # before any staging work

    def push(staged: str) -> None:
        message = args.commit_message or f"lora-ft push: {manifest['kind']} from {Path(args.source).resolve().name}"
        manifest.update(upload(staged, args.repo_id, token=token, private=args.private, revision=args.revision,
                               commit_message=message, endpoint=args.endpoint))

    if args.output:
        manifest = stage(args.source, args.output, args.repo_id, revision=args.revision, base_model=args.base_model, token=token,
                         overwrite=args.overwrite)
        if not args.dry_run:
            push(args.output)
    else:
        with tempfile.TemporaryDirectory(prefix="lora-ft-push-") as tmp:
            manifest = stage(args.source, f"{tmp}/staged", args.repo_id, revision=args.revision, base_model=args.base_model,
                             token=token, link=True)
            push(manifest["staged"])
            manifest["staged"] = None
    manifest["status"] = "staged (dry run: nothing uploaded)" if args.dry_run else "pushed"
    if args.dry_run:
        manifest["endpoint"] = resolve_endpoint(args.endpoint)
    print(json.dumps(manifest, indent=2, ensure_ascii=False))
    return 0
