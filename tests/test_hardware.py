"""Decisions lora_ft takes from the CPU's capability, each under both outcomes whatever this machine is: the
capability is forced (LORA_FT_CPU_CAPABILITY, bitsandbytes' own AVX512-BF16 switch), so an AMX machine's CI also
runs the AVX2 paths, and the other way round. And `lora-ft env`, which reports them."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cls_recipe, train_in_process
from lora_ft import hardware
from lora_ft.cli import main
from lora_ft.config import load_recipe, read_recipe_file
from lora_ft.errors import LoraFtError

FAST_KINDS = ["amx", "avx512_bf16"]
SLOW_KINDS = ["avx512", "avx2", "other"]


@pytest.fixture()
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("kind", FAST_KINDS + SLOW_KINDS)
def test_precision_follows_the_forced_capability(kind, monkeypatch, no_cuda):
    monkeypatch.setenv(hardware.CAPABILITY_ENV, kind)
    mode, why = hardware.precision()
    assert mode == ("bf16" if kind in FAST_KINDS else "fp32")
    assert kind in why and hardware.CAPABILITY_ENV in why
    assert hardware.bf16_supported() is (kind in FAST_KINDS)


def test_detection_reads_the_cpu_flags(monkeypatch):
    cases = {frozenset({"avx2", "amx_bf16", "avx512_bf16", "avx512f"}): "amx",
             frozenset({"avx2", "avx512_bf16", "avx512f"}): "avx512_bf16",
             frozenset({"avx2", "avx512f"}): "avx512", frozenset({"avx2", "fma"}): "avx2", frozenset(): "other"}
    for flags, want in cases.items():
        monkeypatch.setattr(hardware, "cpu_info", lambda f=flags: {"model": "x", "flags": f})
        assert hardware.detected_capability() == want


def test_a_bad_forced_capability_is_an_error(monkeypatch):
    monkeypatch.setenv(hardware.CAPABILITY_ENV, "sse2")
    with pytest.raises(LoraFtError, match="LORA_FT_CPU_CAPABILITY=sse2"):
        hardware.cpu_capability()


@pytest.mark.parametrize("kind, bf16", [("amx", True), ("avx2", False)])
def test_a_run_trains_in_the_precision_its_cpu_kind_gets(kind, bf16, tmp_path, tiny_gpt2, tiny_data, monkeypatch, no_cuda):
    """A recipe without bf16: autocast on an AMX CPU, fp32 on an AVX2-only one (where bf16 is >10x slower); the
    saved recipe records what ran. An explicit bf16 wins over the CPU."""
    monkeypatch.setenv(hardware.CAPABILITY_ENV, kind)
    recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, tiny_data, max_steps=2)
    text = recipe.read_text().replace("bf16: false\n", "")
    recipe.write_text(text)
    assert "bf16" not in load_recipe(str(recipe)).trainer
    run = train_in_process(recipe, tmp_path / "run")
    assert read_recipe_file(run / "lora_ft_recipe.yaml")["bf16"] is bf16
    run2 = train_in_process(recipe, tmp_path / "run2", "--bf16", str(not bf16).lower())
    assert read_recipe_file(run2 / "lora_ft_recipe.yaml")["bf16"] is (not bf16)


@pytest.mark.parametrize("bitsandbytes_says", [True, False])
def test_4bit_training_keeps_the_standard_layout_whatever_bitsandbytes_detects(bitsandbytes_says, tiny_llama, monkeypatch):
    """bitsandbytes repacks 4-bit weights for an inference kernel without backward where it detects AVX512-BF16.
    Forcing its detection both ways: a training load turns the repacking off, so an eval-mode no-grad forward leaves
    every layer in the standard layout (and gradients keep flowing, on any CPU)."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from lora_ft.config import resolve
    from lora_ft.modeling import load_model

    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: bitsandbytes_says)
    a = resolve({"model_name_or_path": str(tiny_llama), "dataset_name": "d", "task": "causal-lm", "load_in_4bit": True}).args
    model, _ = load_model(a, AutoModelForCausalLM)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 9, 13]]))
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model.train()
    emb = model.get_input_embeddings()(torch.tensor([[5, 9, 13]])).detach().requires_grad_(True)
    model(inputs_embeds=emb).logits.float().pow(2).mean().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


# ---------------------------------------------------------------- lora-ft env


def test_env_json_reports_what_lora_ft_decides(capsys, monkeypatch, no_cuda):
    monkeypatch.setenv(hardware.CAPABILITY_ENV, "avx2")
    assert main(["env", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for lib in ("python", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "lora_ft"):
        assert d["versions"][lib], lib
    assert d["cpu"]["capability"] == "avx2" and d["cpu"]["detected_capability"] == hardware.detected_capability()
    assert d["cpu"]["cores"] >= 1 and d["cpu"]["memory_gib"]["total"] > 0
    assert d["precision"]["mode"] == "fp32" and d["cuda_devices"] == []
    assert d["fast_paths"]["bf16_autocast"]["active"] is False
    assert {"cpu_linear4bit", "cpu_dora", "cpu_lm_head", "cpu_memory", "ordered_eval", "atomic_checkpoints"} <= set(d["fast_paths"])
    assert all(p["active"] for k, p in d["fast_paths"].items() if k != "bf16_autocast")  # the pinned versions
    assert d["environment"][hardware.CAPABILITY_ENV] == "avx2"


def test_env_text_names_the_cpu_and_the_forcing(capsys, monkeypatch, no_cuda):
    monkeypatch.setenv(hardware.CAPABILITY_ENV, "amx")
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert hardware.cpu_info()["model"] in out and "trains in: bf16" in out and "bf16_autocast: on" in out
    if hardware.detected_capability() != "amx":
        assert "forced" in out
    assert main(["env", "--jsno"]) == 2
