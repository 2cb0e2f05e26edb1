"""DoRA linear layers on CPU (lora_ft.cpu.dora) against peft's own DoRA: outputs, every gradient, the weight norm,
and the fall-backs to peft."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft.tuners.lora.dora import DoraLinearLayer

from lora_ft.cpu import dora as cpu_dora


def dora_pair(bias=True, dropout=0.0, dtype=torch.float32, seed=0):
    """(peft's model, the same model with cpu_dora installed); lora_B non-zero so the adapter matters."""
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(48, 96, bias=bias), torch.nn.SiLU(), torch.nn.Linear(96, 40, bias=False)).to(dtype)
    ref = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=True, lora_dropout=dropout))
    for name, p in ref.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
        if "magnitude" in name:
            p.data.mul_(torch.linspace(0.8, 1.2, p.numel()))  # m differs from the norm, as after training
    ours = copy.deepcopy(ref)
    assert cpu_dora.install(ours) == 2
    return ref, ours


def step(model, x, autocast: bool):
    model.zero_grad()
    torch.manual_seed(1)  # same dropout mask in both models
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias", [True, False])
def test_without_autocast_equals_peft(bias):
    ref, ours = dora_pair(bias=bias)
    x = torch.randn(6, 48)
    y_ref, g_ref = step(ref, x, autocast=False)
    y, g = step(ours, x, autocast=False)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert len(g) == 6 and g.keys() == g_ref.keys()
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def dora_output_dtypes(model) -> list:
    """Dtypes of what the DoRA modules themselves return (peft's layer casts the sum back to bf16 after)."""
    seen = []
    for m in model.modules():
        if isinstance(m, DoraLinearLayer):
            m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return seen


def test_under_autocast_keeps_the_base_dtype_and_stays_close_to_peft():
    ref, ours = dora_pair()
    x = torch.randn(6, 48)
    ref_dtypes, our_dtypes = dora_output_dtypes(ref), dora_output_dtypes(ours)
    y_ref, g_ref = step(ref, x, autocast=True)
    y, g = step(ours, x, autocast=True)
    assert set(ref_dtypes) == {torch.float32} and set(our_dtypes) == {torch.bfloat16}  # the saving: no fp32 sum
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert (y.float() - y_ref.float()).norm() / y_ref.float().norm() < 2e-2
    for name in g:
        assert g[name].dtype == torch.float32
        assert (g[name] - g_ref[name]).norm() / g_ref[name].norm() < 3e-2, name


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_weight_norm_matches_the_dense_formula(dtype, tol):
    ref, ours = dora_pair(dtype=dtype)
    layer = ours.base_model.model[0]
    A, B = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    s = layer.scaling["default"]
    w = layer.base_layer.weight
    exact = (w.double() + s * (B.double() @ A.double())).norm(dim=1)
    got = cpu_dora.weight_row_norm(layer.lora_magnitude_vector["default"], layer.base_layer, A, B, s)
    assert got.dtype == torch.float32 and not got.requires_grad
    assert ((got.double() - exact).abs() / exact).max() < tol


@pytest.mark.parametrize("train", [True, False])
def test_cached_weight_norm_follows_a_changed_base_weight(train):
    """||W||^2 is cached per layer (and the norm in eval mode); an in-place write to W must not leave them stale."""
    ref, ours = dora_pair()
    ref.train(train), ours.train(train)
    x = torch.randn(3, 48)
    ours(x)
    for model in (ref, ours):
        with torch.no_grad():
            model.base_model.model[0].base_layer.weight.mul_(1.5)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_with_dropout_peft_forward_is_used():
    """With dropout peft recomputes the base output on the dropped input: that path is left to peft."""
    ref, ours = dora_pair(dropout=0.5)
    ref.train(), ours.train()
    x = torch.randn(6, 48)
    y_ref, _ = step(ref, x, autocast=True)
    y, _ = step(ours, x, autocast=True)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


def test_gpt2_conv1d_layers_and_attach_peft(tiny_gpt2):
    """GPT-2's Conv1D stores W transposed (fan_in_fan_out): the norm must read it the right way round. attach_peft
    installs the forward for DoRA recipes."""
    from transformers import AutoModelForSequenceClassification

    from lora_ft.config import resolve
    from lora_ft.modeling import attach_peft

    args = resolve({"model_name_or_path": str(tiny_gpt2), "dataset_name": "d", "use_dora": "true",
                    "lora_target_modules": "c_attn,c_fc"}).args
    torch.manual_seed(0)
    ours = attach_peft(AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, num_labels=3, pad_token_id=0), args, "SEQ_CLS", [])
    dora = [m for m in ours.modules() if isinstance(m, DoraLinearLayer)]
    assert dora and all(type(m) is cpu_dora.CpuDoraLinearLayer for m in dora)
    assert all(m.fan_in_fan_out for m in dora)
    for name, p in ours.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    ref = copy.deepcopy(ours)
    for m in ref.modules():
        if isinstance(m, DoraLinearLayer):
            m.__class__ = DoraLinearLayer  # back to peft's
    ids = torch.randint(5, 100, (2, 7))
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_4bit_base_norm_uses_the_dequantized_weight():
    bnb = pytest.importorskip("bitsandbytes")
    from peft.utils.integrations import dequantize_module_weight

    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 64, bias=False)
    q = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q = q.to("cpu")
    q.support_avx512bf16_for_cpu = False
    model = get_peft_model(torch.nn.Sequential(q), LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, lora_dropout=0.0))
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    w = dequantize_module_weight(layer.base_layer).double()
    assert (w - dense.weight.double()).abs().max() > 1e-3  # the quantized weight, not the original
    exact = (w + s * (B.double() @ A.double())).norm(dim=1)
    got = cpu_dora.weight_row_norm(layer.lora_magnitude_vector["default"], layer.base_layer, A, B, s)
    assert ((got.double() - exact).abs() / exact).max() < 1e-5


@pytest.mark.parametrize("fused", [True, False])
def test_eval_mode_norm_follows_optimizer_steps(fused):
    """Eval mode keeps the norm between forwards; no optimizer step may leave it stale. Fused kernels (the Trainer's
    AdamW) bump no tensor version, and with peft's B = 0 start and this loss B's sum stays exactly 0 for some seeds."""
    sign = torch.cat([torch.ones(20), -torch.ones(20)])
    for seed in range(20):
        torch.manual_seed(seed)
        base = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.SiLU(), torch.nn.Linear(96, 40, bias=False))
        ref = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["2"], use_dora=True))
        ours = copy.deepcopy(ref)
        cpu_dora.install(ours)
        x = torch.randn(8, 48)
        for model in (ref, ours):
            model.eval()
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused, foreach=None if fused else False)
            model(x)  # caches the norm
            (model(x) * sign).sum().backward()
            opt.step()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5, msg=f"seed {seed}")


def test_eval_cache_computes_the_norm_once(monkeypatch):
    ref, ours = dora_pair()
    ours.eval()
    calls = []
    real = cpu_dora._frozen_weight
    monkeypatch.setattr(cpu_dora, "_frozen_weight", lambda layer: calls.append(1) or real(layer))
    x = torch.randn(3, 48)
    with torch.no_grad():
        for _ in range(4):
            ours(x)
    assert len(calls) == 2  # two layers, once each
    ours.train()
    ours(x)
    assert len(calls) == 4  # train mode: afresh


def test_inference_mode_then_a_grad_forward():
    """A norm cached under torch.inference_mode (pipelines use it) cannot be saved for backward."""
    ref, ours = dora_pair()
    ours.eval()
    x = torch.randn(3, 48)
    with torch.inference_mode():
        ours(x)
    xg = x.clone().requires_grad_(True)
    ours(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_model_with_the_cpu_forward_pickles(tmp_path):
    ref, ours = dora_pair()
    torch.save(ours, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    x = torch.randn(3, 48)
    torch.testing.assert_close(back(x), ours(x))


def test_4bit_rows_that_are_not_whole_blocks():
    """lora_ft's norm of a 4-bit weight whose 96-wide rows are not whole 64-blocks is right on every CPU. On AVX512
    CPUs bitsandbytes 0.50's native CPU dequantization, which peft's DoRA uses, gets such rows wrong (row norms off by
    up to 48%; 4-bit rounding alone: under 3%); on AVX2-only CPUs it is right (0.029). So peft's error is measured and
    reported, and lora_ft's path, which never takes the native kernel for partial blocks, is what is asserted."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft.utils.integrations import dequantize_module_weight

    torch.manual_seed(0)
    dense = torch.randn(64, 96)
    q = bnb.nn.Linear4bit(96, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.clone(), requires_grad=False, quant_type="nf4")
    q = q.to("cpu")
    q.support_avx512bf16_for_cpu = False
    model = get_peft_model(torch.nn.Sequential(q), LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, lora_dropout=0.0))
    layer = model.base_model.model[0]  # lora_B starts at zero: the norm is the base weight's
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    got = cpu_dora.weight_row_norm(layer.lora_magnitude_vector["default"], layer.base_layer, A, B, s)
    want = dense.norm(dim=1)
    peft_norm = dequantize_module_weight(layer.base_layer).float().norm(dim=1)
    native_error = float(((peft_norm - want).abs() / want).max())  # > 0.2 where the upstream bug is present
    assert ((got - want).abs() / want).max() < 0.05, f"lora_ft's norm is off (bitsandbytes' native path: {native_error:.3f})"
