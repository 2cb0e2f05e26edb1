"""4-bit layers trained on CPU (lora_ft.cpu.linear4bit) against bitsandbytes' own path, and the load/prepare steps
around them: the weight layout kept for training, bf16 weights kept bf16, trainable weights in fp32."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from lora_ft.cpu import linear4bit as cpu_linear4bit  # noqa: E402


def quantized_linear(n_in=128, n_out=192, bias=False, quant_type="nf4", nested=False, seed=0, compute=torch.bfloat16):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(n_in, n_out, bias=bias)
    q = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=compute, quant_type=quant_type,
                          compress_statistics=nested)
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                 compress_statistics=nested)
    if bias:
        q.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")  # quantizes
    q.support_avx512bf16_for_cpu = False  # the layout lora_ft trains with (modeling.keep_standard_4bit_layout)
    return q


def run(layer, x, autocast: bool):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y, x.grad


@pytest.mark.parametrize("quant_type,nested,bias", [("nf4", False, False), ("fp4", False, True), ("nf4", True, False)])
@pytest.mark.parametrize("autocast", [False, True])
def test_matches_bitsandbytes_output_and_input_gradient(quant_type, nested, bias, autocast):
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(1))
    ref_layer = quantized_linear(bias=bias, quant_type=quant_type, nested=nested)
    ours = quantized_linear(bias=bias, quant_type=quant_type, nested=nested)
    cpu_linear4bit.install(torch.nn.Sequential(ours))
    y_ref, g_ref = run(ref_layer, x, autocast)
    y, g = run(ours, x, autocast)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0, atol=1e-6 if not autocast else 2e-2)
    torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-5 if not autocast else 2e-2)


def test_output_keeps_the_autocast_dtype():
    """bitsandbytes casts back to the input's dtype: fp32 activations saved downstream. nn.Linear does not."""
    x = torch.randn(3, 128)
    ours = quantized_linear()
    cpu_linear4bit.install(torch.nn.Sequential(ours))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert quantized_linear()(x).dtype == torch.float32  # bitsandbytes' own
        assert ours(x).dtype == torch.bfloat16
        ours.eval()
        assert ours(x).dtype == torch.float32  # eval: bitsandbytes' dtype, so scores match `lora-ft predict`
        ours.train()
    assert ours(x).dtype == torch.float32  # no autocast: the input's dtype, as before


def test_layers_of_one_shape_share_a_buffer_without_mixing_weights():
    """Two same-shape layers stacked: the second forward overwrites the shared buffer before the first backward."""
    a, b = (quantized_linear(128, 128, seed=s, compute=torch.float32) for s in (1, 2))
    dense = [bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float() for m in (a, b)]
    stack = torch.nn.Sequential(a, b)
    assert cpu_linear4bit.install(stack) == 2
    x = torch.randn(4, 128, requires_grad=True)
    stack(x).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    (xr @ dense[0].T @ dense[1].T).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_one_buffer_per_shape_and_dtype():
    q = quantized_linear(128, 192)
    scratch = {}
    first = cpu_linear4bit.dequantize_into_scratch(q.weight, q.weight.quant_state, torch.bfloat16, scratch)
    again = cpu_linear4bit.dequantize_into_scratch(q.weight, q.weight.quant_state, torch.bfloat16, scratch)
    fp32 = cpu_linear4bit.dequantize_into_scratch(q.weight, q.weight.quant_state, torch.float32, scratch)
    assert first.data_ptr() == again.data_ptr() and len(scratch) == 2
    torch.testing.assert_close(fp32, bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float())


def test_rows_of_partial_blocks_dequantize_right():
    """bitsandbytes 0.50's native CPU kernel gets rows that are not whole 64-blocks wrong (max error ~2 on randn
    weights); those shapes take its generic path here."""
    torch.manual_seed(0)
    w = torch.randn(100, 96)
    p = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4").to("cpu")
    got = cpu_linear4bit.dequantize_into_scratch(p, p.quant_state, torch.float32, {})
    assert (got - w).abs().max() < 0.6  # nf4's own rounding of randn weights: ~0.5


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_standard_layout_keeps_bitsandbytes_own_backward_after_an_eval():
    """The repacking itself: with bitsandbytes' forward (no lora_ft forward installed), an eval-mode no-grad call
    repacks the weight for a kernel without backward, unless modeling.keep_standard_4bit_layout turned it off."""
    from lora_ft.modeling import keep_standard_4bit_layout

    def grad_after_eval(layer):
        layer.eval()
        with torch.no_grad():
            layer(torch.randn(2, 128))
        layer.train()
        return run(layer, torch.randn(3, 128), autocast=False)[1]

    plain = quantized_linear()
    plain.support_avx512bf16_for_cpu = True  # bitsandbytes' default on this CPU
    assert grad_after_eval(plain) is None  # the trap: no gradient reaches the input any more
    kept = quantized_linear()
    kept.support_avx512bf16_for_cpu = True
    keep_standard_4bit_layout(torch.nn.Sequential(kept))
    assert grad_after_eval(kept) is not None


def test_training_after_an_eval_still_passes_gradient_through_4bit_layers(tiny_llama):
    """bitsandbytes repacks 4-bit weights at a no-grad eval forward on AVX512-BF16 CPUs, and the packed kernel has no
    backward: after the first eval, layers stopped passing gradient to their input. A training load keeps the layout."""
    from transformers import AutoModelForCausalLM

    from lora_ft.config import resolve
    from lora_ft.modeling import load_model

    a = resolve({"model_name_or_path": str(tiny_llama), "dataset_name": "d", "task": "causal-lm",
                 "load_in_4bit": True}).args
    model, _ = load_model(a, AutoModelForCausalLM)
    ids = torch.tensor([[5, 9, 13, 21, 8, 3]])

    def input_grad():
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=emb).logits.float().pow(2).mean().backward()
        return emb.grad.clone()

    model.train()
    before = input_grad()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    torch.testing.assert_close(input_grad(), before)


def test_bf16_weights_stay_bf16_and_trainable_ones_are_fp32(tiny_llama):
    from transformers import AutoModelForSequenceClassification

    from lora_ft.config import resolve
    from lora_ft.modeling import attach_peft, load_model, new_top_modules

    a = resolve({"model_name_or_path": str(tiny_llama), "dataset_name": "d", "load_in_4bit": True,
                 "dtype": "bfloat16", "labels": ["a", "b", "c"]}).args
    ids = torch.tensor([[5, 9, 13, 21]])
    for mixed_precision in (True, False):
        model, new = load_model(a, AutoModelForSequenceClassification, num_labels=3)
        model = attach_peft(model, a, "SEQ_CLS", new_top_modules(model, new), mixed_precision=mixed_precision)
        frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
        heads = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad and "score" in n}
        assert frozen and set(frozen.values()) == {torch.bfloat16}, frozen  # peft alone upcasts these to fp32
        # under autocast the head trains in fp32; without it, fp32 weights would meet bf16 inputs and fail
        assert heads and set(heads.values()) == {torch.float32 if mixed_precision else torch.bfloat16}, heads
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision):
            model(input_ids=ids).logits.float().sum().backward()
