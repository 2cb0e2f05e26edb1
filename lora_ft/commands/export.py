"""`lora-ft export MODEL_DIR --format gguf|onnx|bnb4 --output PATH [--quant f16|q8_0]`: each export is loaded back and checked."""

from __future__ import annotations

import argparse
import json

from ..trust import add_trust_args

HELP = "export a merged model to GGUF (Llama-family causal LMs), ONNX (classification, seq2seq) or a bitsandbytes 4-bit folder, verified"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help=HELP, description=HELP)
    p.add_argument("model_dir", help="a folder written by `lora-ft merge`")
    p.add_argument("--format", required=True, choices=["gguf", "onnx", "bnb4"])
    p.add_argument("--output", required=True, help="a .gguf file, or a folder for onnx")
    p.add_argument("--quant", default="f16", help="gguf only: f16 (default) or q8_0")
    p.add_argument("--inputs", help="onnx, bnb4: texts to verify on (.txt one per line); default: built-in samples")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output that `lora-ft export` did not write")
    add_trust_args(p)
    return p


def run(args, overrides: list[str]) -> int:
    from ..errors import LoraFtError
    from ..trust import from_args

    if overrides:
        raise LoraFtError(f"export: unknown option(s) {' '.join(overrides)}; see `lora-ft export --help`")
    if args.format == "gguf":
        from ..export.gguf import export_gguf

        report = export_gguf(args.model_dir, args.output, quant=args.quant, overwrite=args.overwrite)
    elif args.format == "bnb4":
        from ..export.bnb import export_bnb4
        from ..inference import read_texts

        report = export_bnb4(args.model_dir, args.output, read_texts(args.inputs) if args.inputs else None,
                             overwrite=args.overwrite, trust=from_args(args))
    else:
        from ..export.onnx import export_onnx
        from ..inference import read_texts

        report = export_onnx(args.model_dir, args.output, read_texts(args.inputs) if args.inputs else None,
                             overwrite=args.overwrite, trust=from_args(args))
    print(json.dumps(report, indent=2, default=str))
    return 0
