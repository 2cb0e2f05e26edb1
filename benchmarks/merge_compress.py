"""Merge reports and compression tables for trained SmolLM2 runs (issue 4): verified merge, then each method.

    .venv/bin/python benchmarks/merge_compress.py --cls RUN_DIR [--sft RUN_DIR] [--max-samples 500]

Defaults point at the run dirs the other benchmarks leave in benchmarks/out/. Every step is the real CLI.
Writes benchmarks/results/merge_compress.json and .md.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "merge_compress"
RESULTS = ROOT / "benchmarks" / "results"
TWEETS = (ROOT / "../shared/data/tweet_sentiment").resolve()
INSTRUCTIONS = (ROOT / "../shared/data/instructions/gpteacher_sft.jsonl").resolve()  # relative comparison: same rows both ways


def cli(*args) -> None:
    subprocess.run([str(ROOT / ".venv/bin/lora-ft"), *map(str, args)], cwd=ROOT, check=True)


def one(run: Path, name: str, methods: list[str], data: Path, split: str, max_samples: int, gguf: bool) -> dict:
    merged = OUT / f"{name}-merged"
    t0 = time.time()
    cli("merge", run, "--output", merged)
    entry = {"run": str(run), "merge_seconds": round(time.time() - t0, 1),
             "merge_report": json.loads((merged / "merge_report.json").read_text()), "compression": {}}
    for m in methods:
        out = OUT / f"{name}-{m.replace(':', '-')}"
        cli("compress", merged, "--method", m, "--eval-dataset", data, "--split", split, "--max-samples", max_samples, "--output", out)
        entry["compression"][m] = json.loads((out / "compress_report.json").read_text())
    if gguf:
        for q in ("f16", "q8_0"):
            path = OUT / f"{name}-{q}.gguf"
            cli("export", merged, "--format", "gguf", "--output", path, "--quant", q)
            entry.setdefault("gguf", {})[q] = {"size_mb": round(path.stat().st_size / 2**20, 1)}
    return entry


def table(results: dict) -> str:
    lines = ["| model | method | size MB (orig -> new) | latency ms/ex (orig -> new) | metric (orig -> new) |", "|---|---|---|---|---|"]
    for name, e in results.items():
        for m, r in e["compression"].items():
            o, c = r["original"], r["compressed"]
            lines.append(f"| {name} | {m} | {o['size_mb']:.0f} -> {c['size_mb']:.0f} | {o['latency_ms_per_example']:.1f} -> "
                         f"{c['latency_ms_per_example']:.1f} | {o['metric_name']} {o['metric']:.4f} -> {c['metric']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cls", type=Path, default=ROOT / "benchmarks/out/smollm2-lora")
    ap.add_argument("--sft", type=Path, default=ROOT / "benchmarks/out/sft_smollm2")
    ap.add_argument("--max-samples", type=int, default=500)
    args = ap.parse_args()
    results = {}
    if (args.cls / "adapter_config.json").is_file():
        results["smollm2_tweets"] = one(args.cls, "cls", ["int8", "nf4", "prune:0.3", "prune:0.3:structured"], TWEETS, "test",
                                        args.max_samples, gguf=False)
    if (args.sft / "adapter_config.json").is_file():
        results["smollm2_sft"] = one(args.sft, "sft", ["int8", "nf4", "prune:0.3"], INSTRUCTIONS, "train", min(args.max_samples, 100), gguf=True)
    if not results:
        print("no trained runs found; run benchmarks/cls_tweets.py and benchmarks/sft_smollm2.py first", file=sys.stderr)
        return 2
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "nproc": os.cpu_count(), "loadavg": os.getloadavg(),
            "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "merge_compress.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    (RESULTS / "merge_compress.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
