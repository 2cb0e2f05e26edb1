"""Serving load test: requests/s, p50/p99 latency and changed labels of `lora-ft serve` on a classifier, one speed
lever at a time, beside the serving path before issue 21 (the same settings with the levers off) and a naive server.

    python benchmarks/serve_load.py                     # the SmolLM2 tweet classifier from benchmarks/cls_tweets.py
    python benchmarks/serve_load.py --run RUN_DIR --requests 64 --rows today,all
    python benchmarks/serve_load.py --as-cpu avx2 --rows naive,today,all  # an estimate of an AVX2-only CPU

Each row starts a real server process (127.0.0.1, a free port) and drives it with 32 concurrent clients over HTTP,
one tweet per request, the same tweets in every row. Labels are compared with `lora-ft predict` on the run (fp32):
a row that changes a label says so (the int8 rows are lossy by design), and each row's accuracy against the
dataset's labels says what the changes cost. The onnx rows serve the run merged (`lora-ft merge`) and exported
(`lora-ft export --format onnx`, verified), made once under benchmarks/out/. The naive row is
benchmarks/naive_serve.py. Writes benchmarks/results/serve_load_<cpu kind>.{json,md} (amx, avx512, avx2: what
lora_ft/hardware.py detects; serve_load_avx2_emulated.* with --as-cpu:
lora_ft, torch, oneDNN and MKL limited to AVX2 on this machine's clocks and caches, an estimate, not a measurement;
onnxruntime's own kernels are not limited, so its row there is not an AVX2 figure).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cls_tweets import machine  # noqa: E402  (the same machine description in every benchmark)
from throughput import EMULATE  # noqa: E402  (what makes this machine's kernels those of an AVX2-only CPU)

TWEETS = ROOT / "../shared/data/tweet_sentiment/test.csv"
CLI = [sys.executable, "-m", "lora_ft.cli"]  # this checkout's lora_ft, whatever the venv's console script points at
BATCH = ["--max-batch-size", "32", "--max-wait-ms", "10"]
OFF = {"--dtype": "float32", "--merge": None, "--inference-mode": None, "--group-by-length": None, "--threads": "0"}  # before issue 21


def levers(**on) -> list[str]:
    """BATCH plus every lever off but those in `on` (flag -> value; None for a boolean flag turned on)."""
    out = list(BATCH)
    for flag, off in OFF.items():
        if flag in on:
            out += [flag] + ([on[flag]] if on[flag] is not None else [])
        else:
            out += [flag] + [off] if off is not None else ["--no-" + flag[2:]]
    return out


ROWS = {  # name: (server, model, arguments)
    "naive": ("naive", "run", []),
    "today": ("serve", "run", levers()),
    "+merge": ("serve", "run", levers(**{"--merge": None})),
    "+inference_mode": ("serve", "run", levers(**{"--inference-mode": None})),
    "+bf16": ("serve", "run", levers(**{"--dtype": "auto"})),
    "+length_groups": ("serve", "run", levers(**{"--group-by-length": None})),
    "+threads_1": ("serve", "run", levers(**{"--threads": "1"})),
    "all": ("serve", "run", BATCH),
    "all_int8": ("serve", "run", BATCH + ["--dtype", "int8"]),  # opt-in and lossy: its changed labels are counted
    "onnx": ("serve", "onnx", BATCH + ["--backend", "onnx"]),
    "onnx_int8": ("serve", "onnx", BATCH + ["--backend", "onnx", "--dtype", "int8"]),  # lossy, as all_int8
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, model: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = ([sys.executable, str(ROOT / "benchmarks/naive_serve.py"), str(model)] if kind == "naive" else
           [*CLI, "serve", f"clf={model}"]) + ["--port", str(port), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not come up in 600 s")


async def drive(url: str, texts: list[str], clients: int) -> tuple[dict, list]:
    queue = list(enumerate(texts))
    latencies: list[float] = []
    labels: list = [None] * len(texts)
    errors = 0

    async def worker(c: httpx.AsyncClient):
        nonlocal errors
        while queue:
            i, text = queue.pop()
            t0 = time.perf_counter()
            r = await c.post(url + "/v1/classify", json={"model": "clf", "inputs": [text]})
            latencies.append(time.perf_counter() - t0)
            errors += r.status_code != 200
            if r.status_code == 200:
                labels[i] = r.json()["results"][0]["label"]

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as c:
        await c.post(url + "/v1/classify", json={"model": "clf", "inputs": texts[:1]})  # warm-up, not counted
        started = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(clients)))
        wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    return {"clients": clients, "requests": len(latencies), "errors": errors, "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 2), "p50_ms": round(q[49] * 1000, 1),
            "p99_ms": round(q[98] * 1000, 1)}, labels


def cli(*args: str) -> None:
    subprocess.run([*CLI, *args], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def onnx_model(run: Path) -> Path:
    """The run merged, then exported to ONNX (both verified by lora-ft), made once."""
    merged, onnx = run.with_name(run.name + "-merged"), run.with_name(run.name + "-onnx")
    if not (merged / "merge_report.json").is_file():
        cli("merge", str(run), "--output", str(merged), "--overwrite")
    if not (onnx / "export_report.json").is_file():
        cli("export", str(merged), "--format", "onnx", "--output", str(onnx), "--overwrite")
    return onnx


def reference_labels(run: Path, texts: list[str], out: Path) -> list[str]:
    """`lora-ft predict` on the run, as a user runs it (fp32)."""
    src, dst = out / "serve_load_inputs.jsonl", out / "serve_load_predict.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    cli("predict", str(run), "--input", str(src), "--output", str(dst))
    return [json.loads(line)["label"] for line in dst.read_text(encoding="utf-8").splitlines()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=str(ROOT / "benchmarks/out/smollm2-lora"), help="a classification run dir")
    p.add_argument("--requests", type=int, default=192, help="requests per row (one tweet each)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--rows", default=",".join(ROWS), help=f"rows to run, of {', '.join(ROWS)}")
    p.add_argument("--as-cpu", choices=list(EMULATE), help="every process's kernels limited as on that CPU kind (an estimate)")
    args = p.parse_args()
    if args.as_cpu:  # before any server (or predict) process starts: each reads them at import
        os.environ.update(EMULATE[args.as_cpu])
    run = Path(args.run)
    if not (run / "adapter_config.json").is_file():
        raise SystemExit(f"{run}: not an adapter run dir; run `python benchmarks/cls_tweets.py --only smollm2-lora` first or pass --run")
    with open(TWEETS, newline="", encoding="utf-8") as fh:
        rows_in = [r for r in csv.DictReader(fh) if r["text"].strip()][: args.requests]
    texts, gold = [r["text"] for r in rows_in], [r["sentiment"] for r in rows_in]
    names = [n for n in args.rows.split(",") if n]
    if not set(names) <= set(ROWS):
        raise SystemExit(f"--rows: {', '.join(sorted(set(names) - set(ROWS)))} not among {', '.join(ROWS)}")
    info, out_dir = machine(), run.parent
    want = reference_labels(run, texts, out_dir)
    models = {"run": run, "onnx": onnx_model(run) if {"onnx", "onnx_int8"} & set(names) else None}
    rows = []
    for name in names:
        kind, model, extra = ROWS[name]
        load = os.getloadavg()[0]
        proc, url = start_server(kind, models[model], extra)
        try:
            row, labels = asyncio.run(drive(url, texts, args.clients))
        finally:
            proc.terminate()
            proc.wait(30)
        changed = [i for i, (g, w) in enumerate(zip(labels, want)) if g is not None and g != w]
        accuracy = sum(g == t for g, t in zip(labels, gold)) / len(gold)  # against the dataset's labels: what a change costs
        rows.append({"row": name, "server": kind, "args": " ".join(extra), **row, "labels_changed": len(changed),
                     "accuracy": round(accuracy, 4),
                     "changed_inputs": changed, "loadavg_1min_before": round(load, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2)})
        print(json.dumps(rows[-1]), flush=True)
    by = {r["row"]: r["requests_per_s"] for r in rows}
    ratios = {f"{a}_vs_{b}": round(by[a] / by[b], 2) for a, b in (("all", "today"), ("all", "naive"), ("onnx", "today"),
                                                                   ("today", "naive"), ("all_int8", "today"),
                                                                   ("all_int8", "naive"), ("onnx", "naive"),
                                                                   ("onnx_int8", "today"), ("onnx_int8", "naive")) if a in by and b in by}
    out = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": info,
           "run": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run), "clients": args.clients,
           "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]), "rows": rows, "ratios": ratios,
           "emulated_cpu": args.as_cpu}
    write(out, "serve_load_" + (f"{args.as_cpu}_emulated" if args.as_cpu else info["capability"]))  # one file per CPU kind
    return 0


def write(out: dict, stem: str) -> None:
    results = ROOT / "benchmarks/results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    m = out["machine"]
    md = ["# `lora-ft serve` load test: one tweet per request, /v1/classify, speed levers one at a time", "",
          f"{out['date']}, {m['cpu_model']} ({m['capability']}), {m['nproc']} cores, run `{out['run']}`, "
          f"{out['clients']} concurrent clients; server and clients on the same machine. Labels compared with "
          "`lora-ft predict` on the run (fp32)."
          + (f" EMULATED {out['emulated_cpu']}: kernels limited as on such a CPU, an estimate, not a measurement."
             if out["emulated_cpu"] else ""), "",
          "| row | server arguments | req/s | p50 ms | p99 ms | errors | labels changed | accuracy | load 1-min before |",
          "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['row']} | `{r['args'] or 'benchmarks/naive_serve.py'}` | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} "
           f"| {r['errors']} | {r['labels_changed']} / {r['requests']} | {r['accuracy']} | {r['loadavg_1min_before']} |"
           for r in out["rows"]]
    md += ["", "Ratios of req/s: " + ", ".join(f"{k} {v}x" for k, v in out["ratios"].items()) + ".",
           f"Command: `{out['command']}`"]
    (results / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
