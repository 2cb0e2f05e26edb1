"""`lora-ft predict RUN_DIR --text T [--text T ...] | --input FILE [--output FILE.jsonl]`."""

from __future__ import annotations

import argparse
import json
import sys

from ..trust import add_trust_args

HELP = "classify texts with a trained run; one JSON line per text"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help=HELP, description=HELP)
    p.add_argument("run_dir")
    p.add_argument("--text", action="append", default=[], help="a text to classify (repeatable)")
    p.add_argument("--input", help="file of texts: .txt (one per line), .csv, .json, .jsonl")
    p.add_argument("--text_column", default="text", help="column of --input holding the text")
    p.add_argument("--output", help="write JSON lines here instead of stdout")
    p.add_argument("--batch_size", type=int, default=32)
    add_trust_args(p)
    return p


def run(args, overrides: list[str]) -> int:
    from ..errors import LoraFtError
    from ..inference import load_run, read_texts
    from ..tasks import get_task
    from ..trust import from_args

    if overrides:
        raise LoraFtError(f"predict: unknown option(s) {' '.join(overrides)}; see `lora-ft predict --help`")
    texts = list(args.text)
    if args.input:
        texts += read_texts(args.input, args.text_column)
    if not texts:
        raise LoraFtError("predict: no input; pass --text TEXT or --input FILE")
    model, tok, recipe = load_run(args.run_dir, from_args(args))
    task = get_task(recipe.args.task)
    if task.predict is None:
        raise LoraFtError(f"predict: {args.run_dir} is a {recipe.args.task} run; use `lora-ft generate`")
    rows = task.predict(model, tok, texts, recipe, batch_size=args.batch_size)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for r in rows:
            out.write(json.dumps(r, ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    return 0
