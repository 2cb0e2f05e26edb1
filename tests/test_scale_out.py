"""Scaling out for real on CPU processes (issue 22): FSDP2 through accelerate's plugin, two "machines" on localhost,
DeepSpeed ZeRO-2/3, each checked against the DDP run with the same effective batch. Every launch is the user's
`accelerate launch --config_file recipes/accelerate/X.yaml scripts/sft.py RECIPE` with 2 gloo processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cls_recipe, read_rows, write_recipe
from fixtures_gen import QA, llama_models, write_jsonl  # noqa: F401  (fixtures are used by name)
from lora_ft.cli import main

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
CONFIGS = REPO / "recipes" / "accelerate"
# 6 optimizer steps of 2 processes x 8 rows, a checkpoint every 3: a resume starts from the middle.
STEPS = dict(max_steps=6, save_strategy="steps", save_steps=3, save_total_limit=2, warmup_steps=0)
# Losses and adapters of two engines with the same effective batch. Measured here: FSDP and ZeRO-2 equal DDP bit for
# bit on the classifier; the SFT run under FSDP (trl's LM head, not lora_ft's CPU one) within 2e-7 relative.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4



def has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


needs_deepspeed = pytest.mark.skipif(not has_deepspeed(), reason="deepspeed is not installed (pip install 'lora-ft[deepspeed]')")


def free_port() -> int:
    with socket.socket() as s:  # loopback only; the OS picks a port nobody holds (29500 often is, on a shared box)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(config: str, recipe: Path, out: Path, *overrides, accel_args=()) -> list[str]:
    return [ACCELERATE, "launch", "--config_file", str(CONFIGS / config), *map(str, accel_args),
            str(REPO / "scripts" / "sft.py"), str(recipe), "--output_dir", str(out), *map(str, overrides)]


def env() -> dict:
    # One thread per process on 2 cores; gloo over loopback, the only interface these tests use.
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}


def launch(config: str, recipe: Path, out: Path, *overrides, accel_args=()) -> subprocess.CompletedProcess:
    if "--main_process_port" not in accel_args:
        accel_args = (*accel_args, "--main_process_port", free_port())
    proc = subprocess.run(launch_cmd(config, recipe, out, *overrides, accel_args=accel_args), capture_output=True, text=True,
                          env=env(), timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def losses(run_dir: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h]


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter_model.safetensors")


def assert_same_training(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) and la, (la, lb)
    assert max(abs(x - y) / abs(y) for x, y in zip(la, lb)) <= LOSS_RTOL, (la, lb)
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= WEIGHT_ATOL


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


# ---------------------------------------------------------------- classification: FSDP against DDP


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_llama, tiny_data) -> Path:
    # The tiny Llama has no dropout anywhere: two engines draw nothing differently.
    return cls_recipe(tmp_path_factory.mktemp("scale-out") / "cls.yaml", tiny_llama, tiny_data, **STEPS)


@pytest.fixture(scope="module")
def ddp_run(recipe) -> Path:
    out = recipe.parent / "ddp"
    proc = launch("multi_cpu.yaml", recipe, out, accel_args=("--num_processes", 2))
    assert proc.stdout.count("saved run dir") == 1  # only the main process writes and reports
    return out


@pytest.fixture(scope="module")
def fsdp_run(recipe) -> Path:
    out = recipe.parent / "fsdp"
    proc = launch("fsdp_cpu.yaml", recipe, out)
    assert proc.stdout.count("saved run dir") == 1
    return out


def test_fsdp_run_dir_is_an_ordinary_adapter_run(fsdp_run, tiny_llama, tiny_data, tmp_path, capsys):
    m = metrics(fsdp_run)
    assert m["world_size"] == 2 and m["global_step"] == 6
    # FSDP really sharded: its checkpoints hold the DCP shards of FSDP, which a DDP run never writes.
    assert (fsdp_run / "checkpoint-3" / "pytorch_model_fsdp_0").is_dir() and (fsdp_run / "checkpoint-3" / "optimizer_0").is_dir()
    assert not (fsdp_run / "checkpoint-3" / "adapter_model.safetensors").exists()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fsdp_run)  # the gathered adapter loads with plain peft
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=3, pad_token_id=tok.pad_token_id)
    model = PeftModel.from_pretrained(base, fsdp_run).eval()
    rows = read_rows(tiny_data / "test.csv")[:8]
    enc = tok([r["text"] for r in rows], return_tensors="pt", padding=True, truncation=True, max_length=32)
    with torch.no_grad():
        logits = model(**enc).logits
    labels = ["negative", "neutral", "positive"]
    saved = [json.loads(line)["pred"] for line in (fsdp_run / "eval_predictions.jsonl").read_text().splitlines()[:8]]
    assert [labels[i] for i in logits.argmax(-1).tolist()] == saved

    capsys.readouterr()
    assert main(["predict", str(fsdp_run), "--text", rows[0]["text"]]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == saved[0]

    merged = tmp_path / "merged"
    assert main(["merge", str(fsdp_run), "--output", str(merged)]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    with torch.no_grad():
        assert torch.allclose(plain(**enc).logits, logits, atol=1e-4)


def test_fsdp_losses_match_ddp(fsdp_run, ddp_run):
    assert metrics(ddp_run)["global_step"] == metrics(fsdp_run)["global_step"]
    assert_same_training(fsdp_run, ddp_run)


def test_ddp_run_has_one_writer_and_gathers_eval_from_both_processes(ddp_run, tiny_data):
    """What test_scale_resume's test_two_cpu_processes (slow) checks beside its epoch arithmetic, on this file's DDP run."""
    m = metrics(ddp_run)
    assert m["world_size"] == 2
    assert m["eval_samples"] == len(read_rows(tiny_data / "test.csv"))  # gathered from both processes, no duplicates
    assert len((ddp_run / "eval_predictions.jsonl").read_text().splitlines()) == m["eval_samples"]
    assert not (ddp_run / ".saving").exists()


@pytest.mark.slow  # ~35 s of process launches on 2 cores: `make bench` (the default run keeps FSDP training, predict and merge)
def test_fsdp_resume_from_a_sharded_checkpoint_equals_the_straight_run(fsdp_run, recipe):
    out = recipe.parent / "fsdp-resumed"
    launch("fsdp_cpu.yaml", recipe, out, "--resume_from_checkpoint", fsdp_run / "checkpoint-3")
    assert metrics(out)["global_step"] == 6
    wa, wb = adapter(fsdp_run), adapter(out)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
    assert losses(out)[3:] == pytest.approx(losses(fsdp_run)[3:], rel=LOSS_RTOL)


# ---------------------------------------------------------------- SFT under FSDP


@pytest.mark.slow  # ~35 s of process launches on 2 cores: `make bench` (the default run keeps FSDP training, predict and merge)
def test_fsdp_sft_matches_one_process_with_the_same_batch(tmp_path, llama_models):
    """Causal-LM SFT: trl's trainer under FSDP2 (its LM head gathers the sharded weight), eval generations made by
    every process (a sharded model forwards only with all of them), merged afterwards. Compared with one process of
    batch 8, which the 2 x 4 DDP run also equals."""
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA] * 4
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:4])
    keys = dict(model_name_or_path=str(llama_models[1]), dataset_name=str(tmp_path), task="causal-lm", max_steps=3,
                per_device_train_batch_size=4, per_device_eval_batch_size=8, eval_strategy="no", save_strategy="no",
                report_to="none", logging_steps=1, disable_tqdm=True, bf16=False, max_length=64, lora_r=8, lora_alpha=16,
                lora_dropout=0.0, learning_rate=5e-3, warmup_steps=0, seed=0)
    recipe = write_recipe(tmp_path / "sft.yaml", **keys)
    fsdp = tmp_path / "fsdp"
    proc = launch("fsdp_cpu.yaml", recipe, fsdp)
    assert "step 3 sample:" in proc.stdout and (fsdp / "eval_generations.jsonl").is_file()
    one = tmp_path / "one"
    assert main(["train", str(recipe), "--output_dir", str(one), "--per_device_train_batch_size", "8"]) == 0
    assert metrics(fsdp)["world_size"] == 2
    assert_same_training(fsdp, one)
    assert main(["merge", str(fsdp), "--output", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


# ---------------------------------------------------------------- two machines on localhost


@pytest.mark.slow  # two more launches (~40 s on 2 cores): `make bench`; the configs' parsing stays in the default run
def test_two_machines_on_localhost_take_the_steps_of_one(recipe, ddp_run, tmp_path):
    """multi_node_cpu.yaml as 2 machines x 1 process: machine ranks 0 and 1 against 127.0.0.1, as on real nodes."""
    out = tmp_path / "mn"
    port = free_port()
    cmds = [launch_cmd("multi_node_cpu.yaml", recipe, out, accel_args=("--machine_rank", rank, "--main_process_ip", "127.0.0.1",
                                                                        "--main_process_port", port)) for rank in (0, 1)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO) for c in cmds]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (so, se) in zip(procs, results):
        assert p.returncode == 0, so[-2000:] + se[-4000:]
    assert sum(so.count("saved run dir") for so, _ in results) == 1  # one writer: the main process of machine 0
    assert "saved run dir" in results[0][0]
    m = metrics(out)
    assert m["world_size"] == 2
    assert m["global_step"] == metrics(ddp_run)["global_step"]
    assert losses(out) == pytest.approx(losses(ddp_run), rel=LOSS_RTOL)


# ---------------------------------------------------------------- DeepSpeed ZeRO on CPU


@pytest.fixture(scope="module")
def zero2_run(recipe) -> Path:
    out = recipe.parent / "zero2"
    launch("zero2.yaml", recipe, out)
    return out


# DeepSpeed launches take 20-25 s here (the first one ~100 s: DeepSpeed JIT-builds its CPU comm op once), so they run
# in `make bench`; test_doctor_engine_matrix and test_a_launched_engine_the_trainer_lacks_is_refused cover lora_ft's side.
@needs_deepspeed
@pytest.mark.slow
def test_zero2_trains_like_ddp_and_merges(zero2_run, ddp_run, tmp_path):
    assert metrics(zero2_run)["world_size"] == 2
    assert (zero2_run / "checkpoint-3" / "global_step3").is_dir()  # DeepSpeed's own checkpoint: the engine ran
    assert_same_training(zero2_run, ddp_run)
    assert main(["merge", str(zero2_run), "--output", str(tmp_path / "merged")]) == 0


@needs_deepspeed
@pytest.mark.slow
def test_zero2_resume_equals_the_straight_run(zero2_run, recipe):
    out = recipe.parent / "zero2-resumed"
    launch("zero2.yaml", recipe, out, "--resume_from_checkpoint", zero2_run / "checkpoint-3")
    wa, wb = adapter(zero2_run), adapter(out)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


@needs_deepspeed
@pytest.mark.slow
def test_zero3_continues_an_adapter_like_ddp(fsdp_run, recipe, tmp_path):
    """ZeRO-3 builds the model under deepspeed.zero.Init, which draws random numbers differently: a fresh LoRA A
    (and classifier head) start elsewhere than under DDP (measured: LoRA A differs by 0.25 right after attach). So
    both continue one trained adapter, where nothing is drawn: then ZeRO-3's losses equal DDP's."""
    keys = ("--adapter_name_or_path", fsdp_run, "--max_steps", 3, "--save_strategy", "no")
    launch("zero3.yaml", recipe, tmp_path / "z3", *keys)
    launch("multi_cpu.yaml", recipe, tmp_path / "ddp", *keys, accel_args=("--num_processes", 2))
    assert_same_training(tmp_path / "z3", tmp_path / "ddp")


# ---------------------------------------------------------------- what the doctor says, fast


def doctor_rows(capsys, recipe, *args) -> tuple[int, dict]:
    from test_doctor import doctor

    return doctor(capsys, recipe, *args)


def test_every_accelerate_config_names_its_engine():
    from lora_ft.engines import from_accelerate_config

    got = {p.name: from_accelerate_config(str(p)) for p in sorted(CONFIGS.glob("*.yaml"))}
    assert got == {"ddp.yaml": "ddp", "fsdp_cpu.yaml": "fsdp", "fsdp_qlora.yaml": "fsdp1", "multi_cpu.yaml": "ddp",
                   "multi_node.yaml": "ddp", "multi_node_cpu.yaml": "ddp", "zero2.yaml": "zero2", "zero3.yaml": "zero3"}


def test_doctor_engine_matrix(tmp_path, tiny_llama, tiny_data, capsys, monkeypatch):
    """The doctor's engine verdicts follow the runs: FSDP and ZeRO ran here; what did not is refused with the reason."""
    import lora_ft.engines
    from lora_ft import upstream

    from fixtures_gen import build_tiny_t5

    r = cls_recipe(tmp_path / "r.yaml", tiny_llama, tiny_data)
    rc, rows = doctor_rows(capsys, r, "--accelerate_config", CONFIGS / "fsdp_cpu.yaml")
    assert rc == 0 and rows["engine"] == ("pass", "FSDP2 on CPU processes over gloo (ran here)")
    rc, rows = doctor_rows(capsys, r, "--accelerate_config", CONFIGS / "fsdp_cpu.yaml", "--load_in_8bit", "true")
    assert rc == 1 and rows["quantization"][0] == "fail"
    # FSDP1 (fsdp_qlora.yaml) stopped here with accelerate's "no available devices found": GPU only.
    rc, rows = doctor_rows(capsys, r, "--accelerate_config", CONFIGS / "fsdp_qlora.yaml", "--load_in_4bit", "true")
    assert rc == 1 and rows["engine"][0] == "fail" and "fsdp_cpu.yaml" in rows["engine"][1]

    t5 = build_tiny_t5(tmp_path / "t5")  # seq2seq under FSDP2: T5's tied shared embedding is refused by fully_shard
    s2s = write_recipe(tmp_path / "s2s.yaml", model_name_or_path=str(t5), task="seq2seq", dataset_name=str(tmp_path / "none"))
    rc, rows = doctor_rows(capsys, s2s, "--accelerate_config", CONFIGS / "fsdp_cpu.yaml")
    assert rows["engine"][0] == "fail" and "tied" in rows["engine"][1] and "DDP or DeepSpeed ZeRO" in rows["engine"][1]
    rc, rows = doctor_rows(capsys, s2s, "--accelerate_config", CONFIGS / "zero3.yaml")
    assert rows["engine"][0] == ("pass" if has_deepspeed() else "fail")

    monkeypatch.setattr(lora_ft.engines, "_deepspeed_installed", lambda: False)
    rc, rows = doctor_rows(capsys, r, "--accelerate_config", CONFIGS / "zero2.yaml")
    assert rc == 1 and rows["engine"][0] == "fail" and "pip install 'lora-ft[deepspeed]'" in rows["engine"][1]

    real = upstream.problem
    monkeypatch.setattr(upstream, "problem", lambda name: "simulated change" if name == "cpu_fsdp" else real(name))
    rc, rows = doctor_rows(capsys, r, "--accelerate_config", CONFIGS / "fsdp_cpu.yaml")
    assert rc == 1 and rows["engine"][0] == "fail"
    assert "would train these processes as DDP" in rows["engine"][1] and "simulated change" in rows["engine"][1]


def test_a_launched_engine_the_trainer_lacks_is_refused(tmp_path, tiny_llama, tiny_data, capsys, monkeypatch):
    """Never a silent DDP: one plain process that accelerate's environment says is FSDP trains nothing (the trainer
    sets up no FSDP there), and FSDP on CPU without lora_ft's adjustment is refused before anything loads."""
    from lora_ft import upstream

    r = cls_recipe(tmp_path / "r.yaml", tiny_llama, tiny_data, max_steps=1)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    capsys.readouterr()
    assert main(["train", str(r), "--output_dir", str(tmp_path / "fsdp1")]) == 2  # accelerate's default version: GPU only
    assert "FSDP1 on CPU" in capsys.readouterr().err
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert main(["train", str(r), "--output_dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "accelerate launched FSDP, but the trainer set up" in err and "refusing" in err
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()

    real = upstream.problem
    monkeypatch.setattr(upstream, "problem", lambda name: "simulated change" if name == "cpu_fsdp" else real(name))
    assert main(["train", str(r), "--output_dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "accelerate alone would train DDP instead" in err and "simulated change" in err


def test_lm_head_fast_path_stays_off_sharded_weights():
    import torch

    from lora_ft.cpu.lm_head import _sharded

    w = torch.nn.Parameter(torch.zeros(4, 4))
    assert not _sharded(w)
    w.ds_id = 7  # DeepSpeed ZeRO-3 tags the parameters it partitions
    assert _sharded(w)
