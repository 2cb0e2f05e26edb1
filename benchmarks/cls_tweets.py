"""Tweet sentiment benchmark: real `lora-ft train` runs of the builtin models on the Kaggle tweets.

    python benchmarks/cls_tweets.py                     # every configuration (~40 min on 2 quiet CPU cores)
    python benchmarks/cls_tweets.py --only smollm2-qlora  # one configuration; the others' results are kept
    python benchmarks/cls_tweets.py --quick             # smoke sizes (64 train / 64 test tweets), results in benchmarks/out/

Each configuration is one `lora-ft train recipes/gpt2_sentiment.yaml ...` subprocess; its figures come from the run
dir's metrics.json. Writes benchmarks/results/cls_tweets.{json,md}; run dirs and logs go to benchmarks/out/ (gitignored).
peak_memory_mb is the max RSS of the training process on CPU (model loading included), peak allocated GPU memory on CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/gpt2_sentiment.yaml"
DATA = str((ROOT / "../shared/data/tweet_sentiment").resolve())
SMOL, MINILM = "builtin:smollm2-135m-instruct", "builtin:minilm-l6"
QLORA = ["--load_in_4bit", "true", "--bnb_4bit_quant_type", "nf4"]
# name -> (model, train tweets, overrides on top of the recipe). Every run is evaluated on all 3,534 test tweets.
CONFIGS = {
    "smollm2-lora": (SMOL, 2000, []),
    "smollm2-qlora": (SMOL, 2000, QLORA),
    # An encoder has no LM head to start the classifier from: a random head.
    "minilm-lora": (MINILM, 2000, ["--learning_rate", "1e-3", "--head_init", "random"]),
    "minilm-qlora": (MINILM, 2000, ["--learning_rate", "1e-3", "--head_init", "random", *QLORA]),
    "minilm-lora-4k-2ep": (MINILM, 4000, ["--learning_rate", "1e-3", "--head_init", "random", "--num_train_epochs", "2"]),
}
KEYS = ("eval_accuracy", "eval_macro_f1", "eval_samples", "train_examples", "epoch", "global_step", "train_runtime",
        "train_samples_per_second", "train_tokens_per_second", "peak_memory_mb")


def command(name: str, quick: bool, out: Path) -> list[str]:
    model, n_train, extra = CONFIGS[name]
    cmd = [str(Path(sys.executable).with_name("lora-ft")), "train", RECIPE, "--model_name_or_path", model,
           "--dataset_name", DATA, "--max_train_samples", str(64 if quick else n_train),
           "--output_dir", str(out / name), "--report_to", "none", "--disable_tqdm", "true", *extra]
    return cmd + ["--max_eval_samples", "64"] if quick else cmd


def machine() -> dict:
    from lora_ft import hardware  # one reader of /proc/cpuinfo, the one lora_ft decides from

    info = hardware.cpu_info()
    return {"nproc": os.cpu_count(), "cpu_model": info["model"], "capability": hardware.cpu_capability(),
            "amx_bf16": "amx_bf16" in info["flags"], "avx512_bf16": "avx512_bf16" in info["flags"],
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "torch_threads_default": os.cpu_count(), "loadavg_at_start": os.getloadavg()}


def run_one(name: str, quick: bool, out: Path) -> dict:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume
    cmd = command(name, quick, out)
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    load_before, started = os.getloadavg(), time.time()
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    row = {"name": name, "command": " ".join(cmd[1:]).replace(str(ROOT) + "/", ""), "returncode": rc,
           "wall_s": round(time.time() - started, 1), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    row.update({k: metrics.get(k) for k in KEYS})
    if rc:
        print(f"  FAILED (exit {rc}); see {out / (name + '.log')}", flush=True)
    return row


def table(rows: list[dict]) -> str:
    head = ("| config | train tweets x epochs | test tweets | accuracy | macro-F1 | train s | tweets/s | tokens/s "
            "| peak MB | wall s | load 1-min before/after |\n|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [head]
    for r in rows:
        lines.append(f"| {r['name']} | {r['train_examples'] or '-'} x {fmt(r['epoch'], '.0f')} | {r['eval_samples'] or '-'} "
                     f"| {fmt(r['eval_accuracy'], '.4f')} | {fmt(r['eval_macro_f1'], '.4f')} | {fmt(r['train_runtime'], '.0f')} "
                     f"| {fmt(r['train_samples_per_second'], '.2f')} | {fmt(r['train_tokens_per_second'], '.0f')} "
                     f"| {fmt(r['peak_memory_mb'], '.0f')} | {fmt(r['wall_s'], '.0f')} "
                     f"| {r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=list(CONFIGS), action="append", help="run only this configuration (repeatable)")
    p.add_argument("--quick", action="store_true", help="smoke sizes; results go to benchmarks/out/, not benchmarks/results/")
    args = p.parse_args()
    out = ROOT / "benchmarks" / "out"
    results = out if args.quick else ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    json_path = results / ("cls_tweets_quick.json" if args.quick else "cls_tweets.json")
    old = json.loads(json_path.read_text())["runs"] if json_path.is_file() and args.only else []
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "lora_ft_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
            "git_dirty": bool(subprocess.run(["git", "status", "--porcelain", "lora_ft", RECIPE], cwd=ROOT,
                                             capture_output=True, text=True).stdout.strip()),
            "recipe": RECIPE, "dataset": DATA, "quick": args.quick, "machine": machine()}
    fresh = {r["name"]: r for r in (run_one(n, args.quick, out) for n in (args.only or CONFIGS))}
    rows = [fresh.pop(r["name"], r) for r in old] + list(fresh.values())  # --only replaces its rows, keeps the rest
    json_path.write_text(json.dumps({**info, "runs": rows}, indent=2) + "\n")
    md = (f"# Tweet sentiment (3 classes), `lora-ft train {RECIPE}`\n\n{info['date']}, lora_ft {info['lora_ft_commit'][:10]}"
          f"{' (uncommitted changes)' if info['git_dirty'] else ''}; {info['machine']['nproc']} x {info['machine']['cpu_model']}, "
          f"shared with other jobs (1-min load average in the table). peak MB: max RSS of the process on CPU, model "
          f"loading included.\n\n{table(rows)}\n\nCommands:\n\n" + "\n".join(f"- `{r['name']}`: `{r['command']}`" for r in rows))
    json_path.with_suffix(".md").write_text(md + "\n")
    print("\n" + table(rows))
    return 1 if any(r["returncode"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
