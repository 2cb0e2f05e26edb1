"""Serving load test: requests/s and p50/p99 latency of `lora-ft serve` on a classifier, with and without batching.

    python benchmarks/serve_load.py                           # the SmolLM2 tweet classifier from benchmarks/cls_tweets.py
    python benchmarks/serve_load.py --run RUN_DIR --requests 64

Each setting starts a real `lora-ft serve` process (127.0.0.1, a free port) and drives it with 1, 8 and 32 concurrent
clients over HTTP, one tweet per request. Batching off is `--max-batch-size 1`. Writes benchmarks/results/serve_load.{json,md}.
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
TWEETS = ROOT / "../shared/data/tweet_sentiment/test.csv"
SETTINGS = {"batching": ["--max-batch-size", "32", "--max-wait-ms", "10"], "no-batching": ["--max-batch-size", "1"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("lora-ft")), "serve", f"clf={run}", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not come up in 300 s")


async def drive(url: str, texts: list[str], clients: int) -> dict:
    queue = list(enumerate(texts))
    latencies: list[float] = []
    errors = 0

    async def worker(c: httpx.AsyncClient):
        nonlocal errors
        while queue:
            _, text = queue.pop()
            t0 = time.perf_counter()
            r = await c.post(url + "/v1/classify", json={"model": "clf", "inputs": [text]})
            latencies.append(time.perf_counter() - t0)
            errors += r.status_code != 200

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        await c.post(url + "/v1/classify", json={"model": "clf", "inputs": texts[:1]})  # warm-up, not counted
        started = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(clients)))
        wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    return {"clients": clients, "requests": len(latencies), "errors": errors, "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 2), "p50_ms": round(q[49] * 1000, 1), "p99_ms": round(q[98] * 1000, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=str(ROOT / "benchmarks/out/smollm2-lora"), help="a classification run dir")
    p.add_argument("--requests", type=int, default=192, help="requests per concurrency level")
    p.add_argument("--clients", default="1,8,32")
    args = p.parse_args()
    run = Path(args.run)
    if not (run / "adapter_config.json").is_file() and not (run / "config.json").is_file():
        raise SystemExit(f"{run}: not a run dir; run `python benchmarks/cls_tweets.py --only smollm2-lora` first or pass --run")
    with open(TWEETS, newline="", encoding="utf-8") as fh:
        texts = [r["text"] for r in csv.DictReader(fh) if r["text"].strip()][: args.requests]
    rows = []
    for setting, extra in SETTINGS.items():
        proc, url = start_server(run, extra)
        try:
            for n in map(int, args.clients.split(",")):
                row = {"setting": setting, **asyncio.run(drive(url, texts, n))}
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            proc.terminate()
            proc.wait(30)
    by = {(r["setting"], r["clients"]): r["requests_per_s"] for r in rows}
    top = max(map(int, args.clients.split(",")))
    speedup = round(by[("batching", top)] / by[("no-batching", top)], 2)
    out = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "run": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run),
           "nproc": os.cpu_count(), "loadavg_at_end": os.getloadavg(), "rows": rows, f"batching_speedup_at_{top}_clients": speedup}
    results = ROOT / "benchmarks/results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "serve_load.json").write_text(json.dumps(out, indent=2) + "\n")
    md = ["# `lora-ft serve` load test (one tweet per request, /v1/classify)", "",
          f"{out['date']}, {out['nproc']} CPU cores, run `{out['run']}`; server and clients on the same machine.", "",
          "| setting | clients | requests | req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['setting']} | {r['clients']} | {r['requests']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} |" for r in rows]
    md += ["", f"Batching speedup at {top} clients: {speedup}x. Command: `python benchmarks/serve_load.py`"]
    (results / "serve_load.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
