"""Side-by-side training throughput: lora_ft against the seeds' naive recipe and trl's SFTTrainer defaults, same model,
data, batch and machine, in one run (absolute times on shared machines drift; ratios are the result).

    python benchmarks/throughput.py                 # ~10 min on 2 CPU cores; writes benchmarks/results/throughput.{json,md}
    python benchmarks/throughput.py --steps 6       # shorter

Workloads: (a) tweet classification, builtin SmolLM2-135M, batch 16 (examples drawn from 512 training tweets);
(b) causal SFT on ../shared/data/instructions, SmolLM2-135M, sequence length 512, batch 8. Each row trains
`--steps` optimizer steps; the first `--warmup` are not timed (allocator and autocast caches warm up); model loading
is never timed. tokens/s counts non-pad tokens: examples/s x the workload's mean non-pad tokens per example (all rows
see the same examples). MFU = 6 x parameters x tokens/s / the bf16 matmul peak measured here in the same run.
peak MB: max RSS growth of the row's own process (each row runs in a fresh subprocess).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TWEETS = ROOT / "../shared/data/tweet_sentiment"
INSTR = ROOT / "../shared/data/instructions"
ROWS = {
    "cls/naive": "naive recipe: HF Trainer, padding=max_length 128, fp32, peft LoRA defaults (q,v)",
    "cls/lora_ft": "lora_ft: recipes/gpt2_sentiment.yaml (bf16 autocast, dynamic padding, length-grouped, all-linear DoRA, no dropout)",
    "cls/lora_ft-lora": "lora_ft, the same recipe with --use_dora false (plain LoRA: the recipe trades this speed for accuracy)",
    "cls/lora_ft-qlora": "lora_ft, 4-bit QLoRA (nf4), DoRA as the recipe",
    "cls/lora_ft-qlora-ckpt": "lora_ft, 4-bit QLoRA + gradient_checkpointing: the memory-first setting (as the QLoRA paper runs it)",
    "sft/trl-defaults": "trl SFTTrainer defaults (SFTConfig: bf16, gradient checkpointing, no packing) + peft LoRA defaults",
    "sft/trl-defaults-fp32": "the same with bf16: false, as a user would set it on a CPU without native bf16",
    "sft/lora_ft": "lora_ft: recipes/smollm2_sft.yaml (bf16 autocast, no checkpointing, assistant-only labels, CPU LM head: labelled tokens only, bf16)",
    "sft/lora_ft-qlora": "lora_ft, 4-bit QLoRA (nf4)",
    "sft/lora_ft-qlora-ckpt": "lora_ft, 4-bit QLoRA + gradient_checkpointing (recipes/qwen2.5_1.5b_qlora_sft.yaml's setting)",
}
# lora_ft rows per workload: (recipe, overrides, batch). Peers use the same data and batch; mean_tokens tokenizes it.
WORKLOADS = {"cls": ("recipes/gpt2_sentiment.yaml", ["--model_name_or_path", "builtin:smollm2-135m-instruct", "--dataset_name", str(TWEETS),
                                                     "--max_train_samples", "512", "--per_device_train_batch_size", "16"], 16),
             "sft": ("recipes/smollm2_sft.yaml", ["--dataset_name", str(INSTR), "--max_train_samples", "256"], 8)}
PEERS = {"cls": "cls/naive", "sft": "sft/trl-defaults"}
FP32_PEER = {"sft": "sft/trl-defaults-fp32"}  # on a CPU without native bf16, also against trl set to fp32


# What makes an AMX machine train as an AVX2-only one: lora_ft's decisions, torch's own kernels, oneDNN's (bf16) and
# MKL's (fp32) matmuls. Clocks, caches and memory stay this machine's: an estimate of such a CPU, not a measurement.
EMULATE = {"avx2": {"LORA_FT_CPU_CAPABILITY": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def cpu_record(as_cpu) -> dict:
    from lora_ft import hardware

    import torch

    return {"model": hardware.cpu_info()["model"], "capability": hardware.cpu_capability(),
            "detected_capability": hardware.detected_capability(), "emulated": bool(as_cpu),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": sorted(f for f in hardware.cpu_info()["flags"] if f.startswith(("amx", "avx512_bf16", "avx2")))}


def _peak_key(precision: str) -> str:
    return "fp32" if precision == "fp32" else "bf16"


def bf16_peak_tflops() -> dict:
    """Matmul peak on the device the rows train on (CPU here; the GPU where CUDA is present)."""
    import torch

    cuda = torch.cuda.is_available()
    dev, size, n = ("cuda", 8192, 50) if cuda else ("cpu", 2048, 20)
    out = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(size, size, dtype=dt, device=dev), torch.randn(size, size, dtype=dt, device=dev)
        a @ b  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t0, done = time.perf_counter(), 0
        # n products, or fewer where one takes long (bf16 without native support runs >10x slower than fp32)
        while done < n and (done < 2 or time.perf_counter() - t0 < 10):
            a @ b
            done += 1
        if cuda:
            torch.cuda.synchronize()
        out[name] = float(f"{2 * size**3 * done / (time.perf_counter() - t0) / 1e12:.3g}")  # 3 digits, however slow
    return out


class Timer:
    """A TrainerCallback timing optimizer steps after the warmup."""

    def __new__(cls, warmup: int):
        from transformers import TrainerCallback

        class _T(TrainerCallback):
            def __init__(self):
                self.marks = []

            def on_step_end(self, args, state, control, **kw):
                import torch

                self.precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"

                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # kernels are queued asynchronously: time them done
                self.marks.append(time.perf_counter())

            def result(self, batch):
                timed = self.marks[warmup:]
                span = timed[-1] - self.marks[warmup - 1] if warmup else timed[-1] - timed[0]
                steps = len(timed) if warmup else len(timed) - 1
                return {"timed_steps": steps, "seconds": round(span, 2), "examples_per_s": round(steps * batch / span, 3),
                        "precision": self.precision}

        return _T()


def _rss_mb() -> float:
    from lora_ft.hardware import process_peak_rss_mb

    return process_peak_rss_mb()


def run_row(name: str, steps: int, warmup: int) -> dict:
    """One row, in this (fresh) process."""
    import torch

    torch.manual_seed(0)
    rss0 = _rss_mb()
    timer = Timer(warmup)
    common = ["--max_steps", str(steps), "--eval_split", "none", "--save_strategy", "no", "--report_to", "none",
              "--disable_tqdm", "true", "--logging_steps", "1000", "--output_dir", f"/tmp/lora_ft_throughput/{name.replace('/', '_')}"]
    kind = name.split("/")[0]
    batch = WORKLOADS[kind][2]
    if "/lora_ft" in name:
        import shutil

        from lora_ft.config import load_recipe
        from lora_ft.train import train

        path, overrides, _ = WORKLOADS[kind]
        r = load_recipe(path, [*overrides, *common, *_extra(name)])
        shutil.rmtree(r.trainer["output_dir"], ignore_errors=True)
        train(r, callbacks=[timer])
    elif name == "cls/naive":
        _naive_cls(timer, steps)
    else:
        _trl_sft(timer, steps, fp32=name.endswith("-fp32"))
    row = {"row": name, "what": ROWS[name], "batch": batch, **timer.result(batch), "peak_rss_growth_mb": round(_rss_mb() - rss0, 1),
           "peak_rss_mb": round(_rss_mb(), 1)}
    if torch.cuda.is_available():  # on a GPU the memory that matters is the device's
        row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()  # peers train on the same device as lora_ft's rows


def _extra(name: str) -> list[str]:
    """Recipe overrides of a lora_ft row, from its name."""
    extra = ["--use_dora", "false"] if name.endswith("-lora") else []
    if "-qlora" in name:
        extra += ["--load_in_4bit", "true"]
    if name.endswith("-ckpt"):
        extra += ["--gradient_checkpointing", "true"]
    return extra


def _naive_cls(timer, steps: int) -> None:
    """The seeds' recipe: tokenizer(padding="max_length"), fp32, plain peft LoRA, HF Trainer."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from lora_ft.modeling import resolve_model_path

    path = resolve_model_path("builtin:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    ds = datasets.load_dataset("csv", data_files=str(TWEETS / "train.csv"), split="train", keep_default_na=False)
    ds = ds.filter(lambda r: bool(r["text"].strip())).shuffle(seed=42).select(range(512))
    names = ["negative", "neutral", "positive"]
    ds = ds.map(lambda r: {**tok(r["text"], padding="max_length", truncation=True, max_length=128), "labels": names.index(r["sentiment"])},
                remove_columns=ds.column_names)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, pad_token_id=tok.pad_token_id)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32))
    args = TrainingArguments(output_dir="/tmp/lora_ft_throughput/naive", per_device_train_batch_size=16, max_steps=steps, use_cpu=_no_gpu(),
                             report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1000)
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[timer]).train()


def _trl_sft(timer, steps: int, fp32: bool = False) -> None:
    """trl's SFTTrainer with its SFTConfig defaults (what `trl sft` would do), LoRA through peft_config."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lora_ft.modeling import resolve_model_path

    path = resolve_model_path("builtin:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    ds = datasets.load_dataset("json", data_files=str(INSTR / "gpteacher_sft.jsonl"), split="train").shuffle(seed=42).select(range(256))
    ds = ds.map(lambda r: {"messages": [{"role": "user", "content": (r["instruction"] + "\n\n" + r["context"]).strip()},
                                        {"role": "assistant", "content": r["response"]}]}, remove_columns=ds.column_names)
    fp32 = {"bf16": False} if fp32 else {}
    cfg = SFTConfig(output_dir="/tmp/lora_ft_throughput/trl", per_device_train_batch_size=8, max_length=512, max_steps=steps,
                    use_cpu=_no_gpu(), report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1000, **fp32)
    model = AutoModelForCausalLM.from_pretrained(path)
    SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM"),
               callbacks=[timer]).train()


def mean_tokens() -> dict:
    """Mean non-pad tokens per example of each workload, as lora_ft tokenizes it (the same examples every row sees)."""
    from lora_ft.config import load_recipe
    from lora_ft.modeling import load_tokenizer
    from lora_ft.tasks import get_task

    out = {}
    for key, (path, overrides, _) in WORKLOADS.items():
        r = load_recipe(path, [*overrides, "--eval_split", "none"])
        data = get_task(r.args.task).prepare_data(r, load_tokenizer(r.args))
        out[key] = round(data.train_tokens / len(data.train), 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--as-cpu", choices=["avx2"], help="time this machine as an AVX2-only CPU: lora_ft, torch, oneDNN and "
                   "MKL all limited to AVX2 (an estimate of such a CPU, recorded as emulated)")
    p.add_argument("--only", help="comma-separated row names (default: every row)")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = p.parse_args()
    os.chdir(ROOT)
    if args.as_cpu:  # set before torch loads, here and in every row's process
        os.environ.update(EMULATE[args.as_cpu])
    if args.row:
        print("ROW " + json.dumps(run_row(args.row, args.steps, args.warmup)), flush=True)
        return 0
    peak = bf16_peak_tflops()
    tokens = mean_tokens()
    import torch
    from transformers import AutoConfig

    from lora_ft.memory import count_params
    from lora_ft.modeling import resolve_model_path

    n_params = count_params(AutoConfig.from_pretrained(resolve_model_path("builtin:smollm2-135m-instruct")))
    rows = []
    for name in [r for r in ROWS if not args.only or r in args.only.split(",")]:
        proc = subprocess.run([sys.executable, __file__, "--row", name, "--steps", str(args.steps), "--warmup", str(args.warmup)],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
        if line is None:
            rows.append({"row": name, "what": ROWS[name], "error": proc.stderr[-800:]})
            print(f"{name}: FAILED\n{proc.stderr[-800:]}", flush=True)
            continue
        row = json.loads(line[4:])
        row["tokens_per_s"] = round(row["examples_per_s"] * tokens[name.split("/")[0]], 1)
        # MFU against the peak of the precision the row trained in (fp32 rows on an AVX2 CPU, bf16 under autocast)
        row["mfu_pct"] = round(100 * 6 * n_params * row["tokens_per_s"] / (peak[_peak_key(row["precision"])] * 1e12), 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    by = {r["row"]: r for r in rows if "error" not in r}
    ratios = {}
    speed_pairs = [(a, PEERS[a.split("/")[0]]) for a in ROWS if "/lora_ft" in a]  # every lora_ft row vs its peer
    speed_pairs += [(a, FP32_PEER[a.split("/")[0]]) for a in ROWS if "/lora_ft" in a and a.split("/")[0] in FP32_PEER]
    memory_pairs = [(a, a.split("/")[0] + "/lora_ft") for a in ROWS if "-qlora" in a]  # every 4-bit row vs bf16 LoRA
    for a, b in speed_pairs:
        if a in by and b in by:
            ratios[f"{a} / {b} examples/s"] = round(by[a]["examples_per_s"] / by[b]["examples_per_s"], 2)
    for a, b in memory_pairs:
        if a in by and b in by:
            ratios[f"{a} / {b} peak RSS"] = round(by[a]["peak_rss_mb"] / by[b]["peak_rss_mb"], 2)
            if "peak_gpu_mb" in by[a] and "peak_gpu_mb" in by[b]:
                ratios[f"{a} / {b} peak GPU memory"] = round(by[a]["peak_gpu_mb"] / by[b]["peak_gpu_mb"], 2)
    cpu = cpu_record(args.as_cpu)
    out = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
           "cpu": cpu, "nproc": os.cpu_count(), "loadavg_at_end": os.getloadavg(), "matmul_peak_tflops": peak, "params": n_params,
           "mean_tokens_per_example": tokens, "steps": args.steps, "warmup": args.warmup, "rows": rows, "ratios": ratios}
    res = ROOT / "benchmarks/results"
    res.mkdir(parents=True, exist_ok=True)
    stem = "throughput_" + ("cuda" if torch.cuda.is_available() else cpu["capability"] + ("_emulated" if cpu["emulated"] else ""))
    (res / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    where = out["device"] if torch.cuda.is_available() else f"{cpu['model']}, {cpu['capability']}" + (
        f" (emulated on a {cpu['detected_capability']} CPU: torch, oneDNN and MKL limited to AVX2 kernels)" if cpu["emulated"] else "")
    md = [f"# Training throughput, side by side ({where}, {out['nproc']} cores, {out['date']})", "",
          f"Matmul peaks measured in this run: bf16 {peak['bf16']} TFLOP/s, fp32 {peak['fp32']}. {args.steps} steps per row, first {args.warmup} untimed. "
          "MFU is against the peak of the precision the row trained in.", "",
          "| row | precision | examples/s | tokens/s | MFU % | peak RSS MB | peak GPU MB |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['row']} | {r.get('precision', '-')} | {r.get('examples_per_s', '-')} | {r.get('tokens_per_s', '-')} | {r.get('mfu_pct', '-')} "
           f"| {r.get('peak_rss_mb', '-')} | {r.get('peak_gpu_mb', '-')} |" for r in rows]
    md += ["", "Ratios: " + "; ".join(f"{k} = {v}" for k, v in ratios.items()), "", "Rows:"] + [f"- `{k}`: {v}" for k, v in ROWS.items()]
    md += ["", "Command: `" + " ".join(["python", "benchmarks/throughput.py", *sys.argv[1:]]) + "`"]
    (res / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
