"""lora_ft's patches of upstream internals under a simulated mismatch: another version of the library, a symbol that
moved, a signature that changed. Each patch then stays off with one warning line, and the library's own path runs
with its own result (never a crash, never a silently different one)."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from lora_ft import upstream


@pytest.fixture(autouse=True)
def fresh_checks():
    upstream.reset()
    yield
    upstream.reset()


def other_version(monkeypatch, library: str, version: str = "99.0"):
    real = upstream.installed_version
    monkeypatch.setattr(upstream, "installed_version", lambda lib: version if lib == library else real(lib))
    upstream.reset()


def one_warning(capsys, name: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"[lora_ft] warning: {name} ") and "own path runs instead" in lines[0], err
    return lines[0]


def test_every_patch_passes_on_the_pinned_versions():
    found = upstream.patches()
    assert set(found) >= {"cpu_linear4bit", "cpu_dora", "cpu_lm_head", "cpu_memory", "ordered_eval", "atomic_checkpoints",
                          "keep_4bit_layout"}
    assert {n: upstream.problem(n) for n in found} == dict.fromkeys(found)


def test_the_tested_range_comes_from_the_install_metadata(monkeypatch):
    ranges = upstream.tested_ranges()
    for lib in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes"):
        assert "<" in ranges[lib], f"{lib} has no upper bound in pyproject.toml"
    other_version(monkeypatch, "peft", "0.30.0")
    assert "peft 0.30.0 is outside the tested range" in upstream.version_problem("peft")


def quantized_linear():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    layer.support_avx512bf16_for_cpu = False
    return layer


@pytest.mark.parametrize("mismatch", ["version", "symbol"])
def test_cpu_linear4bit_falls_back_to_bitsandbytes(mismatch, monkeypatch, capsys):
    from lora_ft.cpu import linear4bit as cpu_linear4bit

    if mismatch == "version":
        other_version(monkeypatch, "bitsandbytes", "0.51.0")
    else:
        import bitsandbytes.backends.utils as bnb_utils

        monkeypatch.delattr(bnb_utils, "_get_4bit_code")
    layer = quantized_linear()
    x = torch.randn(3, 128, requires_grad=True)
    want = layer(x)
    model = torch.nn.Sequential(layer)
    capsys.readouterr()
    assert cpu_linear4bit.install(model) == 0
    assert "forward" not in vars(layer)  # bitsandbytes' own forward
    line = one_warning(capsys, "cpu_linear4bit")
    assert ("0.51.0" in line) if mismatch == "version" else ("_get_4bit_code" in line)
    torch.testing.assert_close(model(x), want)
    assert cpu_linear4bit.install(torch.nn.Sequential(quantized_linear())) == 0
    assert capsys.readouterr().err == ""  # one warning per process, not per model


def dora_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.SiLU(), torch.nn.Linear(24, 8))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=True))


@pytest.mark.parametrize("mismatch", ["version", "signature"])
def test_cpu_dora_falls_back_to_peft(mismatch, monkeypatch, capsys):
    from peft.tuners.lora.dora import DoraLinearLayer

    from lora_ft.cpu import dora as cpu_dora

    if mismatch == "version":
        other_version(monkeypatch, "peft", "0.22.0")
    else:
        def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default", extra=None):
            raise AssertionError("never called")

        monkeypatch.setattr(DoraLinearLayer, "forward", forward)
    model = dora_model()
    ref = copy.deepcopy(model)
    capsys.readouterr()
    assert cpu_dora.install(model) == 0
    assert not any(type(m) is cpu_dora.CpuDoraLinearLayer for m in model.modules())
    line = one_warning(capsys, "cpu_dora")
    assert ("0.22.0" in line) if mismatch == "version" else ("extra" in line)
    if mismatch == "version":
        x = torch.randn(2, 16)
        torch.testing.assert_close(model(x), ref(x))


def test_cpu_lm_head_falls_back_to_trl(monkeypatch, capsys, tiny_llama):
    from transformers import AutoModelForCausalLM

    from lora_ft.cpu import lm_head as cpu_lm_head

    other_version(monkeypatch, "trl", "1.17.0")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    trl_like = types.MethodType(type(model).forward, model)
    model.forward = trl_like  # trl sets its fused forward on the instance
    capsys.readouterr()
    assert cpu_lm_head.install(model) is False
    assert model.forward is trl_like
    assert "1.17.0" in one_warning(capsys, "cpu_lm_head")


def test_cpu_memory_hook_stays_off(monkeypatch, capsys):
    bnb = pytest.importorskip("bitsandbytes")
    from lora_ft.cpu import memory as cpu_memory

    other_version(monkeypatch, "bitsandbytes", "0.40.0")
    before = bnb.nn.Params4bit.__dict__["_quantize"]
    capsys.readouterr()
    assert cpu_memory._after_each_quantization(lambda: None) == []
    assert bnb.nn.Params4bit.__dict__["_quantize"] is before
    one_warning(capsys, "cpu_memory")


def test_trainer_overrides_fall_back_to_transformers(monkeypatch, capsys, tmp_path):
    """Without the eval-order override, length grouping is turned off so eval stays in dataset order; without the
    checkpoint override, transformers' own checkpointing runs."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from lora_ft import trainers

    trainers.lora_ft_trainer.cache_clear()
    full = trainers.lora_ft_trainer(Trainer)
    assert "_get_eval_sampler" in vars(full) and "_save_checkpoint" in vars(full)
    trainers.lora_ft_trainer.cache_clear()
    other_version(monkeypatch, "transformers", "5.30.0")
    try:
        capsys.readouterr()
        cls = trainers.lora_ft_trainer(Trainer)
        err = capsys.readouterr().err
        assert "_get_eval_sampler" not in vars(cls) and "_save_checkpoint" not in vars(cls)
        assert "ordered_eval" in err and "atomic_checkpoints" in err and len(err.splitlines()) == 2
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], train_sampling_strategy="group_by_length")
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
        trainer = cls(model=model, args=args)
        assert trainer.args.train_sampling_strategy == "random"
    finally:
        trainers.lora_ft_trainer.cache_clear()  # the next test builds the class with the overrides again


def test_keep_4bit_layout_warns_where_bitsandbytes_moved_the_switch(monkeypatch, capsys):
    from lora_ft.modeling import keep_standard_4bit_layout

    other_version(monkeypatch, "bitsandbytes", "0.60.0")
    layer = quantized_linear()
    layer.support_avx512bf16_for_cpu = True
    capsys.readouterr()
    keep_standard_4bit_layout(torch.nn.Sequential(layer))
    assert layer.support_avx512bf16_for_cpu is False  # set all the same: it may still be read
    one_warning(capsys, "keep_4bit_layout")
