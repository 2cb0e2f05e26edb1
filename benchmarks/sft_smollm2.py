"""SmolLM2-135M instruction tuning benchmark (issue 3): eval loss before/after, and whether generations stop.

    .venv/bin/python benchmarks/sft_smollm2.py [--train 1000] [--prompts 50] [--max_new_tokens 256]

Trains recipes/smollm2_sft.yaml through the real CLI on ../shared/data/instructions, then greedy-generates
for held-out prompts (rows of the seeded eval split that the eval loss did not use) with the base model and
the tuned run, and counts generations that end with the end-of-turn token before max_new_tokens.
Writes benchmarks/results/sft_smollm2.json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / "../shared/data/instructions").resolve()
OUT = ROOT / "benchmarks" / "out" / "sft_smollm2"
RESULTS = ROOT / "benchmarks" / "results" / "sft_smollm2.json"


def held_out_prompts(n: int, skip: int, seed: int = 42):
    from lora_ft.data import load_splits, split_off_eval

    train, _, _ = load_splits(str(DATA), "train", None)
    _, held = split_off_eval(train, 0.1, seed)  # the same split the run held out (eval_size 0.1, seed 42)
    rows = held.shuffle(seed=seed).select(range(skip, skip + n))  # the run's eval used the first `skip` rows
    return [r["instruction"] + (f"\n\n{r['context'].strip()}" if r["context"].strip() else "") for r in rows]


def stop_share(model, tok, prompts, max_new_tokens, system_prompt=None):
    from lora_ft.inference import generate_texts

    outs = generate_texts(model, tok, prompts, max_new_tokens=max_new_tokens, chat=True, system_prompt=system_prompt)
    return sum(o["stopped"] for o in outs) / len(outs), outs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--eval", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--max_length", type=int, default=512, help="training sequence length (recipe default 512)")
    ap.add_argument("--reuse", action="store_true", help="reuse a finished run in benchmarks/out (skip training)")
    ap.add_argument("--skip-base", action="store_true", help="do not generate with the untuned base for comparison")
    args = ap.parse_args()
    cmd = [str(ROOT / ".venv/bin/lora-ft"), "train", "recipes/smollm2_sft.yaml", "--dataset_name", str(DATA),
           "--max_train_samples", str(args.train), "--max_eval_samples", str(args.eval), "--output_dir", str(OUT),
           "--eval_on_start", "true", "--report_to", "none", "--save_strategy", "no", "--max_length", str(args.max_length)]
    t0 = time.time()
    if not (args.reuse and (OUT / "metrics.json").is_file()):
        subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.time() - t0
    metrics = json.loads((OUT / "metrics.json").read_text())

    import torch
    from transformers import AutoModelForCausalLM

    from lora_ft.builtin_models import prepare
    from lora_ft.inference import load_run

    prompts = held_out_prompts(args.prompts, skip=args.eval)
    model, tok, recipe = load_run(OUT)
    tuned_share, tuned = stop_share(model, tok, prompts, args.max_new_tokens, recipe.args.system_prompt)
    base_share = None
    if not args.skip_base:
        base = AutoModelForCausalLM.from_pretrained(prepare("smollm2-135m-instruct"), dtype=torch.float32)
        base_share, _ = stop_share(base, tok, prompts, args.max_new_tokens, recipe.args.system_prompt)
    result = {
        "command": " ".join(cmd), "train_examples": metrics.get("train_examples"), "eval_examples": args.eval,
        "eval_loss_before": metrics.get("eval_loss_before"), "eval_loss_after": metrics.get("eval_loss"),
        "eval_perplexity_after": metrics.get("eval_perplexity"),
        "held_out_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "stop_share_tuned": tuned_share, "stop_share_base": base_share, "target_stop_share": 0.95,
        "train_runtime_s": metrics.get("train_runtime"), "train_tokens_per_second": metrics.get("train_tokens_per_second"),
        "peak_memory_mb": metrics.get("peak_memory_mb"), "wall_s_train_cli": round(wall, 1) if not args.reuse else None,
        "samples": [{"prompt": p[:200], "completion": o["completion"][:300], "stopped": o["stopped"]} for p, o in zip(prompts[:5], tuned)],
        "machine": {"nproc": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg()},
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
