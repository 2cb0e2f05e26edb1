"""GGUF exports run by llama.cpp (issue 21): a short SmolLM2 SFT run, merged, exported f16 / q8_0 / Ollama / GGUF LoRA.

    flock /work/heavy.lock .venv/bin/python benchmarks/export_llamacpp.py [--train 200] [--prompts 10] [--max_new_tokens 64]
        [--run RUN_DIR]   # a finished run of recipes/smollm2_sft.yaml to start from instead of training one

Every step is the real CLI (`lora-ft train`, `merge`, `export --llamacpp require`), in this process. Then held-out
chat prompts (with the run's system prompt) go through transformers on the merged model (fp32, greedy) and through
llama-cpp-python on each file: greedy tokens, teacher-forced argmax, chat-completion text and stop, and speed.
Writes benchmarks/results/export_llamacpp.json and .md. Needs llama-cpp-python (`make llamacpp`).
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cls_tweets import machine  # noqa: E402
from sft_smollm2 import DATA, held_out_prompts  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "export_llamacpp"
RESULTS = ROOT / "benchmarks" / "results"
SYSTEM = "You are a concise assistant."


def cli(*args, report: bool = True) -> dict:
    import contextlib
    import io

    from lora_ft.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([str(a) for a in args])
    if rc:
        raise SystemExit(f"lora-ft {' '.join(map(str, args))} exited {rc}")
    text = buf.getvalue()
    return json.loads(text[text.index("\n{") + 1 if not text.startswith("{") else 0:]) if report else {}


def engines(merged: Path, files: dict, prompts: list[str], n_new: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_ft.export import llamacpp
    from lora_ft.inference import render_prompt

    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}] for p in prompts]
    ids = [render_prompt(tok, c, True) for c in chats]
    t0 = time.time()
    with torch.no_grad():
        hf = [model.generate(input_ids=torch.tensor([i]), max_new_tokens=n_new, do_sample=False,
                             eos_token_id=tok.eos_token_id)[0, len(i):].tolist() for i in ids]
    rows = {"transformers fp32 (merged)": {"tokens_per_s": round(sum(map(len, hf)) / (time.time() - t0), 1)}}
    for name, (path, lora) in files.items():
        llm = llamacpp.load(path, lora)
        t0 = time.time()
        gen = [llamacpp.greedy(llm, i, n_new) for i in ids]
        speed = round(sum(map(len, gen)) / (time.time() - t0), 1)
        quant = "q8_0" if "q8_0" in name else "f16"
        c = llamacpp.compare(llm, model, tok, ids, n_new, quant, chats=chats)
        llm.close()
        rows[name] = {"tokens_per_s": speed, "greedy_exact": sum(c["greedy_exact"]), "n_prompts": len(ids),
                      "greedy_prefix_agreement": round(c["greedy_prefix_agreement"], 4),
                      "teacher_forced_argmax": round(c["greedy_step_agreement"], 4), "max_abs_logit_diff": round(c["max_abs_logit_diff"], 3),
                      "chat_text_same": sum(bool(r["same_text"]) for r in c["chat"]["replies"]),
                      "chat_template_same": sum(c["chat"]["template_renders_same"]),
                      "chat_stopped_at_end_of_turn": sum(r["stopped_at_end_of_turn"] for r in c["chat"]["replies"]),
                      "reference_stopped": sum(r["reference_stopped"] for r in c["chat"]["replies"]), "problems": c["problems"]}
    return rows


def table(rows: dict, sizes: dict) -> str:
    lines = ["| engine / file | MB | greedy tokens identical | teacher-forced argmax | max abs logit diff | chat text same | "
             "stopped at <\\|im_end\\|> (transformers) | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "greedy_exact" not in r:
            lines.append(f"| {name} | | reference | | | | | {r['tokens_per_s']} |")
            continue
        n = r["n_prompts"]
        lines.append(f"| {name} | {sizes.get(name, '')} | {r['greedy_exact']}/{n} | {r['teacher_forced_argmax']:.3f} | "
                     f"{r['max_abs_logit_diff']} | {r['chat_text_same']}/{n} | {r['chat_stopped_at_end_of_turn']}/{n} "
                     f"({r['reference_stopped']}/{n}) | {r['tokens_per_s']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--run", type=Path, help="a finished SFT run to export (default: train one)")
    a = ap.parse_args()
    from lora_ft.export import llamacpp

    if llamacpp.version() is None:
        print("llama-cpp-python does not import here; install it with `make llamacpp`", file=sys.stderr)
        return 2
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    meta = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    run = a.run or OUT / "run"
    if a.run is None:
        cli("train", ROOT / "recipes/smollm2_sft.yaml", "--dataset_name", DATA, "--max_train_samples", a.train, "--max_eval_samples",
            20, "--max_length", 256, "--system_prompt", SYSTEM, "--output_dir", run, "--report_to", "none", "--disable_tqdm", "true",
            report=False)
    meta["run"] = {"dir": str(run), **json.loads((run / "metrics.json").read_text())}
    cli("merge", run, "--output", OUT / "merged", report=False)
    reports = {q: cli("export", OUT / "merged", "--format", "gguf", "--quant", q, "--output", OUT / f"m-{q}.gguf", "--llamacpp", "require")
               for q in ("f16", "q8_0")}
    reports["ollama"] = cli("export", OUT / "merged", "--format", "ollama", "--output", OUT / "ollama", "--llamacpp", "require")
    reports["gguf-lora"] = cli("export", run, "--format", "gguf-lora", "--output", OUT / "adapter.gguf", "--llamacpp", "require")
    from lora_ft.builtin_models import prepare

    cli("export", prepare("smollm2-135m-instruct"), "--format", "gguf", "--output", OUT / "base-f16.gguf", "--llamacpp", "off")
    files = {"llama.cpp f16": (OUT / "m-f16.gguf", None), "llama.cpp q8_0": (OUT / "m-q8_0.gguf", None),
             "llama.cpp base f16 + GGUF LoRA": (OUT / "base-f16.gguf", OUT / "adapter.gguf")}
    sizes = {"llama.cpp f16": reports["f16"]["size_mb"], "llama.cpp q8_0": reports["q8_0"]["size_mb"],
             "llama.cpp base f16 + GGUF LoRA": f"258 + {reports['gguf-lora']['size_mb']}"}
    prompts = held_out_prompts(a.prompts, 20)
    rows = engines(OUT / "merged", files, prompts, a.max_new_tokens)
    meta["loadavg_at_end"] = __import__("os").getloadavg()
    summary = {k: {x: r.get(x) for x in ("checked_by", "size_mb", "verified", "template_family", "modelfile")} for k, r in reports.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "export_llamacpp.json").write_text(json.dumps({"meta": meta, "args": vars(a), "exports": summary, "engines": rows,
                                                              "export_reports": reports}, indent=2, default=str))
    md = table(rows, sizes)
    (RESULTS / "export_llamacpp.md").write_text(f"{md}\n{a.prompts} held-out GPTeacher prompts, system prompt {SYSTEM!r}, "
                                                f"{a.max_new_tokens} new tokens, greedy. {meta['machine']['cpu_model']}, "
                                                f"load {meta['machine']['loadavg_at_start']}.\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
