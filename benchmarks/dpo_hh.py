"""Preference tuning on HH-RLHF harmless (issue 20): SmolLM2-135M-Instruct, eval on the 300 test pairs.

    python benchmarks/dpo_hh.py [--methods dpo,ipo,orpo,simpo,kto] [--max_train dpo=all,other=400] [--speed_pairs 128]

Method rows: `lora-ft train recipes/smollm2_dpo.yaml --preference_method M` through the real CLI, each in its own
process (peak memory is per process); reward accuracy and margin are lora_ft's final eval on the test pairs.
Speed rows: lora_ft and trl's DPOTrainer with its DPOConfig defaults + peft LoRA (r 16, alpha 32, peft's default
targets), same model, the same `--speed_pairs` train pairs (one epoch), batch 8; examples/s over the whole epoch x
the mean tokens of a pair (both sequences) = tokens/s, as benchmarks/throughput.py counts them.
Writes benchmarks/results/dpo_hh.{json,md}.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "out" / "dpo_hh"
RESULTS = ROOT / "benchmarks" / "results" / "dpo_hh"
RECIPE = "recipes/smollm2_dpo.yaml"
BETA = {"simpo": 2.0}  # SimPO's paper range (2-2.5); the others keep trl's 0.1
CLI = [sys.executable, "-c", "import sys; from lora_ft.cli import main; sys.exit(main())"]


def method_row(method: str, max_train, max_eval) -> dict:
    out = OUT / method
    cmd = [*CLI, "train", "--overwrite", RECIPE, "--preference_method", method, "--output_dir", str(out),
           "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]
    cmd += ["--beta", str(BETA[method])] if method in BETA else []
    cmd += ["--max_train_samples", str(max_train)] if max_train else []
    cmd += ["--max_eval_samples", str(max_eval)] if max_eval else []
    load, t0 = os.getloadavg()[0], time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    m = json.loads((out / "metrics.json").read_text())
    return {"row": method, "train_pairs": m["train_examples"], "eval_pairs": m["eval_samples"], "beta": m["beta"],
            "eval_reward_accuracy": m["eval_reward_accuracy"], "eval_reward_margin": m["eval_reward_margin"],
            "eval_logp_accuracy": m["eval_logp_accuracy"], "eval_logp_accuracy_before": m["eval_logp_accuracy_before"],
            "train_runtime_s": round(m["train_runtime"], 1), "train_tokens_per_second": m["train_tokens_per_second"],
            "peak_memory_mb": m["peak_memory_mb"], "wall_s": round(time.time() - t0, 1), "loadavg_1min_start": load,
            "command": " ".join(["lora-ft", *cmd[3:]])}


def speed_row(which: str, pairs: int) -> dict:
    """One speed row, in this (fresh) process."""
    import torch
    from transformers import TrainerCallback

    from lora_ft.config import load_recipe
    from lora_ft.hardware import process_peak_rss_mb
    from lora_ft.modeling import load_tokenizer
    from lora_ft.tasks import preference

    marks = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_train_end(self, *a, **k):
            marks.append(time.perf_counter())

    torch.manual_seed(0)
    common = ["--max_train_samples", str(pairs), "--eval_split", "none", "--save_strategy", "no", "--report_to", "none",
              "--disable_tqdm", "true", "--logging_steps", "1000", "--output_dir", str(OUT / f"speed_{which}")]
    r = load_recipe(RECIPE, common)
    data = preference.prepare_data(r, load_tokenizer(r.args))
    mean_tokens = data.train_tokens / len(data.train)
    if which == "lora_ft":
        import shutil

        from lora_ft.train import train

        shutil.rmtree(r.trainer["output_dir"], ignore_errors=True)
        train(r, callbacks=[Clock()])
    else:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        from lora_ft.modeling import resolve_model_path

        path = resolve_model_path(r.args.model_name_or_path)
        cfg = DPOConfig(output_dir=str(OUT / "speed_trl"), per_device_train_batch_size=8, num_train_epochs=1,
                        use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", disable_tqdm=True,
                        logging_steps=1000)
        DPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=cfg,
                   train_dataset=data.train.remove_columns(["length"]), processing_class=AutoTokenizer.from_pretrained(path),
                   peft_config=LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM"), callbacks=[Clock()]).train()
    span = marks[-1] - marks[0]
    return {"row": f"speed/{which}", "pairs": len(data.train), "seconds": round(span, 1),
            "examples_per_s": round(len(data.train) / span, 3), "tokens_per_s": round(len(data.train) / span * mean_tokens, 1),
            "mean_tokens_per_pair": round(mean_tokens, 1), "peak_rss_mb": round(process_peak_rss_mb(), 1),
            "loadavg_1min": os.getloadavg()[0]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="dpo,ipo,orpo,simpo,kto")
    ap.add_argument("--max_train", default="dpo=all,other=400", help="train pairs per method: all, or a cap")
    ap.add_argument("--max_eval", type=int, default=None, help="cap on test pairs (default: all 300)")
    ap.add_argument("--speed_pairs", type=int, default=128, help="pairs of the lora_ft vs trl speed rows (0: skip)")
    ap.add_argument("--append", action="store_true", help="keep the rows of the last results file (a row run again replaces its own)")
    ap.add_argument("--speed_row", help=argparse.SUPPRESS)  # internal: one speed row in a fresh process
    args = ap.parse_args()
    if args.speed_row:
        print("SPEED " + json.dumps(speed_row(args.speed_row, args.speed_pairs)), flush=True)
        return 0
    caps = dict(kv.split("=") for kv in args.max_train.split(","))
    path = RESULTS.with_suffix(".json")
    rows = json.loads(path.read_text())["rows"] if args.append and path.is_file() else []
    keep = lambda name: [r for r in rows if r["row"] != name]  # noqa: E731
    # speed rows first, then the methods in the order given: each row is written as it finishes
    for which in ("lora_ft", "trl") if args.speed_pairs else ():
        out = subprocess.run([sys.executable, __file__, "--speed_row", which, "--speed_pairs", str(args.speed_pairs)], cwd=ROOT,
                             check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
        rows = keep(f"speed/{which}") + [json.loads(next(ln for ln in out.splitlines() if ln.startswith("SPEED "))[6:])]
        write(rows, args)
    for m in filter(None, args.methods.split(",")):
        cap = caps.get(m, caps.get("other"))
        rows = keep(m) + [method_row(m, None if cap == "all" else int(cap), args.max_eval)]
        write(rows, args)
    return 0


def write(rows: list, args) -> None:
    from cls_tweets import machine

    speed = {r["row"]: r for r in rows if r["row"].startswith("speed/")}
    ratio = (round(speed["speed/lora_ft"]["tokens_per_s"] / speed["speed/trl"]["tokens_per_s"], 2)
             if len(speed) == 2 else None)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "recipe": RECIPE, "rows": rows,
              "speedup_vs_trl_defaults": ratio, "targets": {"dpo_reward_accuracy": 0.62, "speedup_vs_trl_defaults": 1.5},
              "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = [f"# Preference tuning, SmolLM2-135M-Instruct on HH-RLHF harmless ({result['date']})", "",
          f"CPU: {result['machine']['cpu_model']}, {result['machine']['nproc']} cores. Each row's command is in the JSON "
          "(`train pairs` below: the cap of that row; `load`: 1-minute load average when it started).", "",
          "| method | train pairs | beta | eval reward acc | reward margin | logp acc (before -> after) | train s | tokens/s | peak MB | load |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['row']} | {r['train_pairs']} | {r['beta']} | {r['eval_reward_accuracy']:.3f} | {r['eval_reward_margin']:.3f} | "
           f"{r['eval_logp_accuracy_before']:.3f} -> {r['eval_logp_accuracy']:.3f} | {r['train_runtime_s']} | "
           f"{r['train_tokens_per_second']} | {r['peak_memory_mb']} | {r['loadavg_1min_start']:.2f} |" for r in rows if "train_pairs" in r]
    if speed:
        n = next(iter(speed.values()))["pairs"]
        md += ["", f"Speed, the same {n} pairs, one epoch, batch 8 (lora_ft / trl DPOTrainer defaults = {ratio}x):", "",
               "| row | seconds | pairs/s | tokens/s | peak RSS MB | load |", "|---|---|---|---|---|---|"]
        md += [f"| {r['row']} | {r['seconds']} | {r['examples_per_s']} | {r['tokens_per_s']} | {r['peak_rss_mb']} | {r['loadavg_1min']:.2f} |"
               for r in speed.values()]
    RESULTS.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    sys.exit(main())
