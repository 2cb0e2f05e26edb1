"""Scaling out and surviving crashes: accelerate launch configs, 2 CPU processes, atomic checkpoints, SIGKILL + resume
equals an uninterrupted run, mismatched resumes refused, Ctrl-C checkpoints, NaN stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cls_recipe, read_rows, train_in_process, write_csv
from lora_ft.cli import main

ACCEL = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
# 12 steps of batch 8 over 96 rows, a checkpoint every 4 steps.
STEPS = dict(max_steps=12, save_strategy="steps", save_steps=4, save_total_limit=2, eval_split="none",
             per_device_train_batch_size=8, lora_dropout=0.1, warmup_steps=2)


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter_model.safetensors")


def test_accelerate_configs_parse(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    names = {p.name for p in ACCEL}
    assert {"multi_cpu.yaml", "ddp.yaml", "fsdp_qlora.yaml", "zero2.yaml", "zero3.yaml", "multi_node.yaml"} <= names
    for p in ACCEL:
        cfg = load_config_from_file(str(p))
        assert str(cfg.distributed_type).split(".")[-1] in ("MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED"), p
        text = p.read_text()
        for hyper in ("learning_rate", "lora_r", "batch_size:"):  # topology only
            assert hyper not in text, (p, hyper)
    assert (REPO / "recipes/accelerate/multi_node.yaml").read_text().count("# FILL:") == 2


@pytest.mark.slow  # a 2-process launch (~35 s on 2 cores): `make bench`; test_scale_out's DDP run checks the rest by default
def test_two_cpu_processes(tmp_path, tiny_gpt2, tiny_data):
    """accelerate launch with 2 gloo processes: one writer, world_size 2, steps = rows / (2 x batch)."""
    recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, tiny_data, num_train_epochs=1, max_steps=-1, per_device_train_batch_size=8)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(REPO / "recipes/accelerate/multi_cpu.yaml"),
           "--num_processes", "2", str(REPO / "scripts/sft.py"), str(recipe), "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    n_train = len(read_rows(tiny_data / "train.csv"))
    assert m["world_size"] == 2
    assert m["global_step"] == -(-n_train // 16)  # ceil(120 / (2 processes x 8))
    assert m["eval_samples"] == len(read_rows(tiny_data / "test.csv"))  # gathered from both processes, no duplicates
    assert proc.stdout.count("saved run dir") == 1  # only the main process writes and reports
    assert len((out / "eval_predictions.jsonl").read_text().splitlines()) == m["eval_samples"]
    assert not (out / ".saving").exists()


KILLER = """
import os, signal, sys
import transformers
real = transformers.Trainer.training_step
calls = []
def step(self, *a, **k):
    calls.append(1)
    if len(calls) == {kill_at}:
        os.kill(os.getpid(), signal.{sig})
    return real(self, *a, **k)
transformers.Trainer.training_step = step
from lora_ft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_with_signal(tmp_path, argv, kill_at: int, sig: str) -> subprocess.CompletedProcess:
    script = tmp_path / f"kill_{sig}.py"
    script.write_text(KILLER.format(kill_at=kill_at, sig=sig))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), *map(str, argv)], capture_output=True, text=True, env=env, timeout=600)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_gpt2, tiny_data):
    recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, tiny_data, **STEPS)
    straight = tmp_path / "straight"
    assert main(["train", str(recipe), "--output_dir", str(straight)]) == 0

    crashed = tmp_path / "crashed"
    proc = run_with_signal(tmp_path, ["train", recipe, "--output_dir", crashed], kill_at=7, sig="SIGKILL")  # after checkpoint-4
    assert proc.returncode == -signal.SIGKILL
    assert (crashed / "checkpoint-4").is_dir() and not (crashed / "adapter_model.safetensors").exists()
    assert (crashed / "checkpoint-4" / "lora_ft_resume.json").is_file()
    assert main(["train", str(recipe), "--output_dir", str(crashed), "--resume_from_checkpoint", "true"]) == 0

    a, b = adapter(straight), adapter(crashed)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    assert len(list(crashed.glob("checkpoint-*"))) <= 2  # save_total_limit
    assert not (crashed / ".checkpoint-stage").exists()


def test_resume_that_does_not_match_is_refused(tmp_path, tiny_gpt2, tiny_data, capsys):
    recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, tiny_data, **STEPS)
    out = tmp_path / "run"
    proc = run_with_signal(tmp_path, ["train", recipe, "--output_dir", out], kill_at=6, sig="SIGKILL")
    assert proc.returncode == -signal.SIGKILL and (out / "checkpoint-4").is_dir()
    capsys.readouterr()
    assert main(["train", str(recipe), "--output_dir", str(out), "--resume_from_checkpoint", "true",
                 "--per_device_train_batch_size", "4"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-4 does not match" in err and "per_device_train_batch_size: 8 -> 4" in err

    rows = read_rows(tiny_data / "train.csv")
    changed = tmp_path / "changed"
    write_csv(changed / "train.csv", rows[::-1])
    write_csv(changed / "test.csv", read_rows(tiny_data / "test.csv"))
    recipe2 = cls_recipe(tmp_path / "r2.yaml", tiny_gpt2, tiny_data, **STEPS)
    (out / "checkpoint-4" / "lora_ft_resume.json").write_text(
        (out / "checkpoint-4" / "lora_ft_resume.json").read_text().replace('"train_examples": 120', '"train_examples": 119'))
    assert main(["train", str(recipe2), "--output_dir", str(out), "--resume_from_checkpoint", "true"]) == 2
    assert "training data changed" in capsys.readouterr().err


def test_crash_while_writing_a_checkpoint_leaves_the_last_good_one(tmp_path, tiny_gpt2, tiny_data, monkeypatch, capsys):
    import transformers

    recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, tiny_data, **STEPS)
    real = transformers.Trainer._save_rng_state
    calls = []

    def failing(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:  # the second checkpoint dies mid-write
            raise OSError(28, "No space left on device")
        return real(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", failing)
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--output_dir", str(out)]) == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # no half checkpoint-8
    assert not (out / ".checkpoint-stage").exists()
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
    err = capsys.readouterr().err
    assert "No space left on device" in err and "checkpoint-4" in err and "Traceback" not in err


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, tiny_gpt2, tiny_data):
    recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, tiny_data, **{**STEPS, "save_steps": 100})
    out = tmp_path / "run"
    proc = run_with_signal(tmp_path, ["train", recipe, "--output_dir", out], kill_at=3, sig="SIGINT")
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "interrupted at step 3" in proc.stderr and "--resume_from_checkpoint true" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()
    assert main(["train", str(recipe), "--output_dir", str(out), "--resume_from_checkpoint", "true"]) == 0
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 12


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_gpt2, tiny_data, capsys):
    import torch
    import transformers

    real = transformers.Trainer.compute_loss
    calls = []

    def poisoned(self, *a, **k):  # from step 6 on the loss is NaN, as a diverging run's would be
        calls.append(1)
        loss = real(self, *a, **k)
        return loss * torch.tensor(float("nan")) if len(calls) >= 6 else loss

    recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, tiny_data, **{**STEPS, "logging_steps": 1})
    out = tmp_path / "run"
    mp = pytest.MonkeyPatch()
    mp.setattr(transformers.Trainer, "compute_loss", poisoned)
    try:
        capsys.readouterr()
        assert main(["train", str(recipe), "--output_dir", str(out)]) == 2
    finally:
        mp.undo()
    err = capsys.readouterr().err
    assert "NaN/inf by step 6" in err and "checkpoint-4" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert not (out / "adapter_model.safetensors").exists()


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path, tiny_llama, tiny_data):
    """Batch 8 equals batch 4 x 2 accumulation steps: the classifier's mean loss is not left unscaled by transformers."""
    eight = tmp_path / "eight"  # every optimizer step sees all 8 rows, in whatever order either layout draws them
    write_csv(eight / "train.csv", read_rows(tiny_data / "train.csv")[:8])
    keys = dict(max_steps=3, eval_split="none", lora_dropout=0.0, warmup_steps=0)
    # The tiny Llama has no dropout anywhere (GPT-2's would draw differently for the two batch shapes).
    one = cls_recipe(tmp_path / "a.yaml", tiny_llama, eight, per_device_train_batch_size=8, **keys)
    acc = cls_recipe(tmp_path / "b.yaml", tiny_llama, eight, per_device_train_batch_size=4, gradient_accumulation_steps=2, **keys)
    assert main(["train", str(one), "--output_dir", str(tmp_path / "a")]) == 0
    assert main(["train", str(acc), "--output_dir", str(tmp_path / "b")]) == 0
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_save_steps_alone_saves_at_those_steps(tmp_path, tiny_gpt2, tiny_data):
    """`--save_steps 2` without a save_strategy: checkpoints at steps 2 and 4, not only at the end (transformers
    ignores save_steps under lora_ft's default `epoch` strategy, so a run killed at step 3 would have lost everything)."""
    recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, tiny_data, max_steps=5, save_total_limit=5)
    recipe.write_text("".join(ln for ln in recipe.read_text().splitlines(keepends=True) if not ln.startswith("save_strategy:")))
    run = train_in_process(recipe, tmp_path / "run", "--save_steps", "2")
    assert {"checkpoint-2", "checkpoint-4"} <= {p.name for p in run.glob("checkpoint-*")}
