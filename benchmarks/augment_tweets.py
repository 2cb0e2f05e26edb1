"""Does EDA augmentation help small tweet training sets? Builtin MiniLM-L6, 200 and 1,000 training tweets, with and
without `--augment synonym:0.1,swap:0.1,delete:0.1,insert:0.1 --augment_copies 2`, 3 seeds each (the seed picks the
training subset and the initialisation), test accuracy on all 3,534 test tweets.

    python benchmarks/augment_tweets.py        # 12 runs, ~15 min on 2 CPU cores; writes benchmarks/results/augment_tweets.{json,md}
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks/out/augment"
DATA = str((ROOT / "../shared/data/tweet_sentiment").resolve())
AUG = ["--augment", "synonym:0.1,swap:0.1,delete:0.1,insert:0.1", "--augment_copies", "2"]
BASE = ["recipes/gpt2_sentiment.yaml", "--model_name_or_path", "builtin:minilm-l6", "--head_init", "random", "--learning_rate", "1e-3",
        "--dataset_name", DATA, "--num_train_epochs", "3", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true"]
SIZES, SEEDS = (200, 1000), (0, 1, 2)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in SIZES:
        for aug in (False, True):
            for seed in SEEDS:
                name = f"n{n}-{'aug' if aug else 'plain'}-s{seed}"
                run = OUT / name
                shutil.rmtree(run, ignore_errors=True)
                cmd = [str(Path(sys.executable).with_name("lora-ft")), "train", *BASE, "--max_train_samples", str(n), "--seed", str(seed),
                       "--output_dir", str(run), *(AUG if aug else [])]
                rc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).returncode
                m = json.loads((run / "metrics.json").read_text()) if rc == 0 else {}
                row = {"train_tweets": n, "augmented": aug, "seed": seed, "returncode": rc, "train_examples": m.get("train_examples"),
                       "eval_accuracy": m.get("eval_accuracy"), "eval_macro_f1": m.get("eval_macro_f1"), "train_runtime": m.get("train_runtime")}
                print(json.dumps(row), flush=True)
                rows.append(row)
    summary = []
    for n in SIZES:
        for aug in (False, True):
            accs = [r["eval_accuracy"] for r in rows if r["train_tweets"] == n and r["augmented"] == aug and r["eval_accuracy"] is not None]
            summary.append({"train_tweets": n, "augmented": aug, "runs": len(accs), "mean_accuracy": round(statistics.mean(accs), 4) if accs else None,
                            "stdev": round(statistics.stdev(accs), 4) if len(accs) > 1 else None, "min": min(accs, default=None), "max": max(accs, default=None)})
    out = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "nproc": os.cpu_count(),
           "command": "lora-ft train " + " ".join(BASE[:1] + BASE[1:]).replace(DATA, "../shared/data/tweet_sentiment"),
           "augment": " ".join(AUG), "summary": summary, "runs": rows}
    res = ROOT / "benchmarks/results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "augment_tweets.json").write_text(json.dumps(out, indent=2) + "\n")
    md = ["# EDA augmentation on small tweet sets (MiniLM-L6, 3 epochs, test accuracy on 3,534 tweets, 3 seeds)", "",
          "| train tweets | augmentation | mean accuracy | stdev | min | max |", "|---|---|---|---|---|---|"]
    md += [f"| {s['train_tweets']} | {'yes' if s['augmented'] else 'no'} | {s['mean_accuracy']} | {s['stdev']} | {s['min']} | {s['max']} |" for s in summary]
    md += ["", f"Augmentation: `{out['augment']}`. Command: `python benchmarks/augment_tweets.py`"]
    (res / "augment_tweets.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
