"""`lora-ft data inspect DATA [--model_name_or_path M] [--json]`."""

from __future__ import annotations

import argparse

HELP = "inspect a dataset: rows, labels, empty/duplicate/leaked rows, token lengths and a max_length suggestion"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("data", help=HELP, description=HELP)
    s = p.add_subparsers(dest="data_cmd", required=True)
    i = s.add_parser("inspect", help=HELP)
    i.add_argument("dataset", help="a folder of split files, one file, or a Hub id")
    i.add_argument("--model_name_or_path", help="tokenizer for token-length percentiles (a path, Hub id or builtin:NAME)")
    i.add_argument("--text_column", help="default: text, sentence, review, ... whichever the data has")
    i.add_argument("--label_column", help="default: label, sentiment, ... whichever the data has")
    i.add_argument("--histogram", default="token_lengths.png", help="where the token-length histogram PNG goes (with a tokenizer)")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--overwrite", action="store_true", help="replace an existing --histogram file that lora_ft did not write")
    return p


def run(args, overrides: list[str]) -> int:
    import json
    from pathlib import Path

    from ..errors import LoraFtError
    from ..inspect_data import inspect, table

    if overrides:
        raise LoraFtError(f"data: unknown option(s) {' '.join(overrides)}; see `lora-ft data inspect --help`")
    tok = None
    if args.model_name_or_path:
        from transformers import AutoTokenizer

        from ..modeling import resolve_model_path

        try:
            tok = AutoTokenizer.from_pretrained(resolve_model_path(args.model_name_or_path))
        except (OSError, ValueError) as e:
            raise LoraFtError(f"--model_name_or_path: cannot load a tokenizer from '{args.model_name_or_path}' ({str(e).splitlines()[0][:120]})") from None
    report = inspect(args.dataset, args.text_column, args.label_column, tokenizer=tok, histogram=Path(args.histogram) if tok else None,
                     overwrite=args.overwrite)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0
