"""`lora-ft merge RUN_DIR --output merged/ [--dtype bfloat16] [--inputs FILE] [--force]`."""

from __future__ import annotations

import argparse
import json

from ..trust import add_trust_args

HELP = "merge a run's adapter into its full-precision base, verified against the adapter model"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("merge", help=HELP, description=HELP)
    p.add_argument("run_dir", nargs="+", help="one run, or several runs of one base to combine")
    p.add_argument("--output", required=True, help="folder for the merged model (written beside it, then swapped in)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--inputs", help="texts to verify on (.txt one per line, .csv/.jsonl with a text column); "
                   "default: the run's own eval inputs")
    p.add_argument("--combination", default="linear", help="with several runs: linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune")
    p.add_argument("--weights", help="with several runs: comma-separated weight per run (default: equal)")
    p.add_argument("--density", type=float, default=0.5, help="ties/dare/magnitude_prune: fraction of weights kept")
    p.add_argument("--force", action="store_true", help="keep the merged model even if verification fails")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output that is not a `lora-ft merge` folder")
    add_trust_args(p)
    return p


def run(args, overrides: list[str]) -> int:
    from ..errors import LoraFtError
    from ..inference import read_texts
    from ..merge import MergeCheckFailed, merge_many, merge_run
    from ..trust import from_args

    if overrides:
        raise LoraFtError(f"merge: unknown option(s) {' '.join(overrides)}; see `lora-ft merge --help`")
    texts = read_texts(args.inputs) if args.inputs else None
    try:
        if len(args.run_dir) == 1:
            report = merge_run(args.run_dir[0], args.output, dtype=args.dtype, force=args.force, inputs=texts,
                               overwrite=args.overwrite, trust=from_args(args))
        else:
            try:
                weights = [float(w) for w in args.weights.split(",")] if args.weights else None
            except ValueError:
                raise LoraFtError(f"merge: --weights {args.weights}: give numbers separated by commas, e.g. 0.7,0.3") from None
            report = merge_many(args.run_dir, args.output, args.combination, weights, args.density, args.dtype, args.force, texts,
                                overwrite=args.overwrite, trust=from_args(args))
    except MergeCheckFailed as e:
        print(f"lora-ft: error: {e}", file=__import__("sys").stderr)
        return 1
    check = report["adapter_vs_merged"]
    print(json.dumps({"status": report["status"], "output": report["output"], "max_abs_logit_diff": check["max_abs_logit_diff"],
                      "argmax_agreement": check["argmax_agreement"], "metric": report["metric"]}, indent=2))
    return 0
