"""Where 4-bit QLoRA saves memory on CPU: peak RSS of bf16 LoRA vs 4-bit QLoRA as the base model grows.

    python benchmarks/qlora_memory.py     # ~10 min on 2 CPU cores, ~8 GB free disk; writes benchmarks/results/qlora_memory.{json,md}

At 135M parameters (the builtin SmolLM2) the weights are ~0.3 GB of a ~3-5 GB CPU training peak (imports, allocator,
activations), so 4-bit cannot halve the peak there (benchmarks/results/throughput_amx.md). This benchmark measures the
same `lora-ft train recipes/smollm2_sft.yaml` with SmolLM2-shaped Llama models of 135M and 1.7B parameters. The
1.7B one has random weights (no 1.7B model is available offline): memory does not depend on the values, and the loss
is not looked at. Every run: 3 optimizer steps, batch 2 x 256 tokens, no eval; peak = max RSS of the process, model
loading included (what `lora-ft train` records as peak_memory_mb).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

from memory_plan import LORA_FT, SHORT, short_run  # the same 3-step runs, nothing saved

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks/out/qlora_memory"
DATA = str((ROOT / "../shared/data/instructions").resolve())
# SmolLM2-1.7B's shape (hidden 2048, 24 layers, MLP 8192, 32 heads, vocab 49,152)
BIG = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32}
# Pairs differ only in the linear layers' weights: bf16 vs 4-bit (embeddings and norms bf16 in both).
# qlora-nf4-fp32rest is the recipe default (dtype float32: embeddings and norms in fp32).
GC = ["--gradient_checkpointing", "true"]
MODES = {"lora-fp32": ["--dtype", "float32"], "lora-bf16": ["--dtype", "bfloat16"],
         "qlora-nf4": ["--load_in_4bit", "true", "--dtype", "bfloat16"], "qlora-nf4-fp32rest": ["--load_in_4bit", "true"],
         "lora-bf16-ckpt": ["--dtype", "bfloat16", *GC], "qlora-nf4-ckpt": ["--load_in_4bit", "true", "--dtype", "bfloat16", *GC]}
PAIRS = {"no checkpointing": ("qlora-nf4", "lora-bf16"), "gradient checkpointing": ("qlora-nf4-ckpt", "lora-bf16-ckpt")}
BATCH = ["--per_device_train_batch_size", "2", "--max_length", "256"]


def base_args(model: str) -> list[str]:
    return ["recipes/smollm2_sft.yaml", "--dataset_name", DATA, "--model_name_or_path", model, *BATCH]


def shown(cmd: list[str]) -> str:
    return " ".join(["lora-ft", *cmd[1:]]).replace(str(ROOT) + "/", "")


def random_big_model() -> Path:
    """A random-weight SmolLM2-1.7B-shaped model with the builtin's tokenizer, saved once in bf16."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lora_ft.modeling import resolve_model_path

    folder = OUT / "smollm2-1.7b-shape-random"
    if (folder / "config.json").exists():
        return folder
    small = resolve_model_path("builtin:smollm2-135m-instruct")
    cfg = AutoConfig.from_pretrained(small)
    for k, v in BIG.items():
        setattr(cfg, k, v)
    cfg.head_dim = BIG["hidden_size"] // BIG["num_attention_heads"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(small).save_pretrained(folder)
    return folder


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    models = {"smollm2-135m": "builtin:smollm2-135m-instruct", "1.7b-shape-random": str(random_big_model())}
    rows = []
    for model_name, model in models.items():
        for mode, extra in MODES.items():
            cmd, proc, m = short_run([*base_args(model), *extra], OUT / f"{model_name}-{mode}")
            row = {"model": model_name, "mode": mode, "returncode": proc.returncode, "peak_memory_mb": m.get("peak_memory_mb"),
                   "train_runtime_s": m.get("train_runtime"), "command": shown(cmd),
                   **({"error": proc.stderr[-600:]} if proc.returncode else {})}
            print(json.dumps(row), flush=True)
            rows.append(row)
    by = {(r["model"], r["mode"]): r["peak_memory_mb"] for r in rows}
    ratios = {f"{m}, {pair}": round(by[(m, q)] / by[(m, lo)], 2) for m in models for pair, (q, lo) in PAIRS.items()
              if by.get((m, q)) and by.get((m, lo))}
    out = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "nproc": os.cpu_count(),
           "rows": rows, "qlora_over_bf16_lora_peak": ratios}
    res = ROOT / "benchmarks/results"
    (res / "qlora_memory.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [f"# Peak RSS: bf16 LoRA vs 4-bit QLoRA by model size (CPU, {out['nproc']} cores, {out['date']})", "",
          "| model | mode | peak RSS MB | train s (3 steps) |", "|---|---|---|---|"]
    md += [f"| {r['model']} | {r['mode']} | {r['peak_memory_mb']} | {r['train_runtime_s']} |" for r in rows]
    md += ["", "QLoRA / bf16 LoRA peak: " + "; ".join(f"{k} {v}" for k, v in ratios.items()), "",
           "Command: `python benchmarks/qlora_memory.py` (each row: " + shown([LORA_FT, "train", *base_args("MODEL"), *SHORT])
           + " plus the mode's flags)"]
    (res / "qlora_memory.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
