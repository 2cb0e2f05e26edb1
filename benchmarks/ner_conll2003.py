"""CoNLL-2003 NER benchmark: real `lora-ft train recipes/bert_conll2003_ner.yaml` runs of the builtin models, each
scored with `lora-ft eval` on the test split (entity-level micro F1, strict IOB2, seqeval).

    python benchmarks/ner_conll2003.py                          # every row, full train split (hours on 2 CPU cores)
    python benchmarks/ner_conll2003.py --only minilm-lora       # one row; the others' results are kept
    python benchmarks/ner_conll2003.py --only minilm-lora --max_train 4000 --epochs 1 --max_validation 1000
    python benchmarks/ner_conll2003.py --quick                  # smoke sizes, results in benchmarks/out/

Training selects on validation (eval_f1, load_best_model_at_end); the test split is only read by the final eval, on all
3,453 sentences unless --max_test caps it (the table says how many). Writes benchmarks/results/ner_conll2003.{json,md};
run dirs and logs go to benchmarks/out/ (gitignored). peak MB: max RSS of the training process on CPU.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cls_tweets import machine  # noqa: E402  (the same machine description in every benchmark)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/bert_conll2003_ner.yaml"
DATA = str((ROOT / "../shared/data/conll2003").resolve())
QLORA = ["--load_in_4bit", "true", "--bnb_4bit_quant_type", "nf4"]
# name -> (model, overrides on top of the recipe)
CONFIGS = {
    "minilm-lora": ("builtin:minilm-l6", []),
    "smollm2-lora": ("builtin:smollm2-135m-instruct", ["--learning_rate", "5e-4", "--per_device_train_batch_size", "16"]),
    "minilm-qlora": ("builtin:minilm-l6", QLORA),
}
KEYS = ("train_examples", "epoch", "global_step", "train_runtime", "train_samples_per_second", "train_tokens_per_second",
        "peak_memory_mb", "eval_f1")


def lora_ft() -> str:
    return str(Path(sys.executable).with_name("lora-ft"))


def run_one(name: str, args, out: Path) -> dict:
    model, extra = CONFIGS[name]
    run_dir = out / f"ner-{name}"
    if not args.rescore:
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume
    caps = [("--max_train_samples", args.max_train), ("--max_eval_samples", args.max_validation),
            ("--num_train_epochs", args.epochs)]
    cmd = [lora_ft(), "train", RECIPE, "--model_name_or_path", model, "--dataset_name", DATA, "--output_dir", str(run_dir),
           "--report_to", "none", "--disable_tqdm", "true", *extra, *(x for k, v in caps if v is not None for x in (k, str(v)))]
    # The run's saved recipe carries the validation cap as max_eval_samples: the test split gets its own, all by default.
    test = [lora_ft(), "eval", str(run_dir), "--dataset_name", DATA, "--split", "test",
            "--max_eval_samples", str(args.max_test or 10**9)]
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    load_before, started = os.getloadavg(), time.time()
    with open(out / f"ner-{name}.log", "a" if args.rescore else "w") as log:
        rc = 0 if args.rescore else subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        test_out = subprocess.run(test, cwd=ROOT, capture_output=True, text=True) if rc == 0 else None
        log.write(test_out.stderr if test_out else "")
    row = {"name": name, "command": " ".join(cmd[1:]).replace(str(ROOT) + "/", ""), "returncode": rc or (test_out.returncode if test_out else 0),
           "wall_s": round(time.time() - started, 1), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    row.update({k: metrics.get(k) for k in KEYS})
    row["validation_f1"] = row.pop("eval_f1")
    if test_out is not None and test_out.returncode == 0:
        m = json.loads(test_out.stdout)
        row.update({"test_f1": m["eval_f1"], "test_precision": m["eval_precision"], "test_recall": m["eval_recall"],
                    "test_token_accuracy": m["eval_token_accuracy"], "test_sentences": m["eval_samples"],
                    "test_per_type_f1": {k: v["f1"] for k, v in m["eval_per_type"].items()}})
    if row["returncode"]:
        print(f"  FAILED (exit {row['returncode']}); see {out / f'ner-{name}.log'}", flush=True)
    return row


def table(rows: list[dict]) -> str:
    head = ("| config | train sentences x epochs | test sentences | test F1 | P | R | validation F1 | train s | tokens/s "
            "| peak MB | load 1-min before/after |\n|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [head]
    for r in rows:
        lines.append(f"| {r['name']} | {r['train_examples'] or '-'} x {fmt(r['epoch'], '.2g')} | {r.get('test_sentences') or '-'} "
                     f"| {fmt(r.get('test_f1'), '.4f')} | {fmt(r.get('test_precision'), '.4f')} | {fmt(r.get('test_recall'), '.4f')} "
                     f"| {fmt(r['validation_f1'], '.4f')} | {fmt(r['train_runtime'], '.0f')} | {fmt(r['train_tokens_per_second'], '.0f')} "
                     f"| {fmt(r['peak_memory_mb'], '.0f')} | {r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=list(CONFIGS), action="append", help="run only this row (repeatable)")
    p.add_argument("--max_train", type=int, help="cap on train sentences (default: all 14,041)")
    p.add_argument("--epochs", type=float, help="num_train_epochs (default: the recipe's)")
    p.add_argument("--max_validation", type=int, help="cap on validation sentences used for selection (default: all 3,250)")
    p.add_argument("--max_test", type=int, help="cap on test sentences (default: all 3,453)")
    p.add_argument("--quick", action="store_true", help="smoke sizes; results go to benchmarks/out/")
    p.add_argument("--rescore", action="store_true", help="keep the trained run dirs (same caps), rerun only the test eval")
    args = p.parse_args()
    if args.quick:
        args.max_train, args.epochs, args.max_validation, args.max_test = 64, 1, 32, 32
    out = ROOT / "benchmarks" / "out"
    results = out if args.quick else ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    json_path = results / ("ner_conll2003_quick.json" if args.quick else "ner_conll2003.json")
    old = json.loads(json_path.read_text())["runs"] if json_path.is_file() and args.only else []
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "lora_ft_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
            "recipe": RECIPE, "dataset": DATA, "rescore": args.rescore, "caps": {k: getattr(args, k) for k in ("max_train", "epochs", "max_validation", "max_test")},
            "machine": machine()}
    fresh = {r["name"]: r for r in (run_one(n, args, out) for n in (args.only or CONFIGS))}
    rows = [fresh.pop(r["name"], r) for r in old] + list(fresh.values())  # --only replaces its rows, keeps the rest
    json_path.write_text(json.dumps({**info, "runs": rows}, indent=2) + "\n")
    md = (f"# CoNLL-2003 NER, `lora-ft train {RECIPE}` + `lora-ft eval --split test`\n\n{info['date']}, lora_ft "
          f"{info['lora_ft_commit'][:10]}; {info['machine']['nproc']} x {info['machine']['cpu_model']} (1-min load average "
          f"in the table: above 2, other jobs shared the cores). Each row's caps are in its command. Entity-level micro F1, "
          f"strict IOB2 (seqeval).\n\n"
          f"{table(rows)}\n\nCommands:\n\n" + "\n".join(f"- `{r['name']}`: `{r['command']}`" for r in rows))
    json_path.with_suffix(".md").write_text(md + "\n")
    print("\n" + table(rows))
    return 1 if any(r["returncode"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
