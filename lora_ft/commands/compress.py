"""`lora-ft compress MODEL_DIR --method int8|nf4|prune:S[:structured] --eval-dataset DATA [--output DIR]`."""

from __future__ import annotations

import argparse
import json

from ..trust import add_trust_args

HELP = "compress a merged model and measure size, latency and the task metric before and after"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("compress", help=HELP, description=HELP)
    p.add_argument("model_dir", help="a folder written by `lora-ft merge`")
    p.add_argument("--method", required=True, help="int8, nf4, prune:S or prune:S:structured (0 < S < 1)")
    p.add_argument("--eval-dataset", "--eval_dataset", dest="eval_dataset", required=True,
                   help="data to measure on, with the recipe's columns (file or folder)")
    p.add_argument("--split", help="split of --eval-dataset (default: the recipe's eval_split)")
    p.add_argument("--max-samples", "--max_samples", dest="max_samples", type=int, default=500)
    p.add_argument("--output", help="folder for the compressed model and its report (default: MODEL_DIR-METHOD)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output that is not a `lora-ft compress` folder")
    add_trust_args(p)
    return p


def run(args, overrides: list[str]) -> int:
    from ..compress import compress, markdown_table
    from ..errors import LoraFtError
    from ..trust import from_args

    if overrides:
        raise LoraFtError(f"compress: unknown option(s) {' '.join(overrides)}; see `lora-ft compress --help`")
    report = compress(args.model_dir, args.method, args.eval_dataset, args.output, args.split, args.max_samples,
                      overwrite=args.overwrite, trust=from_args(args))
    print(markdown_table(report))
    print(json.dumps({"output": report["output"], "size_ratio": report["size_ratio"], "metric_delta": report["metric_delta"]}))
    return 0
