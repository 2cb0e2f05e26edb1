"""`lora-ft export MODEL_DIR --format gguf|ollama|gguf-lora|onnx|bnb4 --output PATH [--quant f16|q8_0]`: each export is loaded back and checked."""

from __future__ import annotations

import argparse
import json

from ..trust import add_trust_args

HELP = ("export a merged model to GGUF (Llama, Qwen2, GPT-2 causal LMs), an Ollama folder, a run's adapter as a GGUF LoRA, "
        "ONNX (classification, seq2seq) or a bitsandbytes 4-bit folder, verified")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help=HELP, description=HELP)
    p.add_argument("model_dir", help="a folder written by `lora-ft merge` (gguf-lora: a run dir with a LoRA adapter)")
    p.add_argument("--format", required=True, choices=["gguf", "ollama", "gguf-lora", "onnx", "bnb4"])
    p.add_argument("--output", required=True, help="a .gguf file (gguf, gguf-lora), or a folder (ollama, onnx, bnb4)")
    p.add_argument("--quant", default="f16", help="gguf, ollama: f16 (default) or q8_0")
    p.add_argument("--llamacpp", default="auto", choices=["auto", "require", "off"],
                   help="gguf, ollama, gguf-lora: also run the file in llama.cpp (auto: where llama-cpp-python is installed)")
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

        report = export_gguf(args.model_dir, args.output, quant=args.quant, overwrite=args.overwrite, llama_cpp=args.llamacpp)
    elif args.format == "ollama":
        from ..export.ollama import export_ollama

        report = export_ollama(args.model_dir, args.output, quant=args.quant, overwrite=args.overwrite, llama_cpp=args.llamacpp)
    elif args.format == "gguf-lora":
        from ..export.gguf_lora import export_gguf_lora

        report = export_gguf_lora(args.model_dir, args.output, overwrite=args.overwrite, llama_cpp=args.llamacpp,
                                  trust=from_args(args))
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
