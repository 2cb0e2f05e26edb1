"""DoRA linear layers trained on CPU: the weight norm in closed form, the output in the base layer's dtype.

peft's DoRA (0.21) computes, at every forward of every adapted linear layer,
- the row norms of W + s*BA by building that dense matrix: under bf16 autocast BA comes out bf16, so the
  out x in add runs with dtype promotion (a profile of the tweet classifier: about 10% of each step), and
- its output as (m - 1) * base + m * lora * s with m in fp32: four activation-sized elementwise ops in fp32
  whose result peft casts back to the base output's dtype (bf16 under autocast) straight after.
Here the norm comes from ||W_i||^2 (cached: W is frozen) + 2s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T, which
costs one out x in x r matmul, and the output is computed in the base output's dtype (bf16 under autocast, as the
plain LoRA path computes it; fp32 without autocast, where the result equals peft's to rounding).
The norm stays detached from the graph and the magnitude gets its gradient, as in peft (DoRA paper, section 4.3).
In eval mode the norm is kept while the weights are unchanged, so inference computes it once per layer.
Only DoraLinearLayer on CPU with no LoRA dropout takes this path; everything else goes to peft unchanged.
"""

from __future__ import annotations

import torch

from .. import upstream

try:
    from peft.tuners.lora.dora import DoraLinearLayer
except ImportError:  # moved in another peft: the guard below keeps this patch off, and no layer is of this class
    class DoraLinearLayer(torch.nn.Module):
        pass

_SCRATCH: dict = {}  # 4-bit weights dequantized for the norm: one fp32 buffer per shape, used at once
_OPTIMIZER_STEPS = [0]  # optimizer steps taken in this process: fused kernels update weights without version bumps
_STEP_HOOK: list = []


def _relies_on():
    """peft's DoRA layer (its forward's keywords, the attributes read here) and the helpers this file calls."""
    from peft.tuners.lora.dora import DoraLinearLayer as peft_layer
    from peft.utils import integrations, other
    from torch.optim import optimizer

    return upstream.first_problem(
        upstream.expect_params(peft_layer.forward, "self", "x", "lora_A", "lora_B", "scaling", "base_layer", "base_result",
                               "adapter_name"),
        None if "fan_in_fan_out" in upstream.inspect.getsource(peft_layer.__init__) else "DoraLinearLayer has no fan_in_fan_out",
        upstream.expect_attrs(other, "transpose"),
        upstream.expect_attrs(integrations, "dequantize_bnb_weight", "dequantize_module_weight"),
        upstream.expect_params(integrations.dequantize_bnb_weight, "weight", "state"),
        upstream.expect_attrs(optimizer, "register_optimizer_step_post_hook"),
    )


upstream.register(upstream.Patch("cpu_dora", "peft", "closed-form DoRA weight norm on CPU", _relies_on))


def install(model) -> int:
    """Give every DoRA linear layer of `model` the CPU forward. Returns how many layers got it (0 where the installed
    peft is not the one this was written against: peft's own DoRA forward then runs)."""
    if not any(type(m) is DoraLinearLayer for m in model.modules()) or not upstream.usable("cpu_dora"):
        return 0
    if not _STEP_HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEP_HOOK.append(register_optimizer_step_post_hook(_count_step))
    n = 0
    for m in model.modules():
        if type(m) is DoraLinearLayer:  # subclasses (embedding, conv) keep peft's forward
            m.__class__ = CpuDoraLinearLayer  # a class, not an instance method: the model still pickles
            n += 1
    return n


def _count_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


class CpuDoraLinearLayer(DoraLinearLayer):
    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
        if base_result is None or x.device.type != "cpu":  # dropout on (peft recomputes the base) or not CPU
            return super().forward(x, lora_A=lora_A, lora_B=lora_B, scaling=scaling, base_layer=base_layer,
                                   base_result=base_result, adapter_name=adapter_name)
        m = (self.weight / weight_row_norm(self, base_layer, lora_A.weight, lora_B.weight, scaling)).view(1, -1)
        lora_result = lora_B(lora_A(x))
        dt = base_result.dtype
        if base_layer.bias is not None:
            base_result = base_result - base_layer.bias.to(dt)
        return torch.addcmul(base_result * (m - 1).to(dt), lora_result.to(dt), (m * scaling).to(dt))


@torch.no_grad()
def weight_row_norm(dora, base_layer, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Row norms of W + scaling * B @ A (fp32, detached) without forming the out x in matrix.

    In eval mode the norm is kept for the next forward (predict and serve compute it once per layer) while W, A and
    B are unchanged: same tensors and in-place versions, and no optimizer step since (fused optimizer kernels, the
    Trainer's AdamW among them, update weights without bumping versions). Writes through `.data` go unseen, as they
    do by autograd. In train mode the norm is computed afresh and nothing is kept."""
    from peft.utils.other import transpose

    bw = base_layer.weight
    w_key = (id(bw), bw.data_ptr(), bw._version)
    key = None
    if dora.training:
        dora.__dict__.pop("_lora_ft_norm", None)
    else:
        key = (w_key, A.data_ptr(), A._version, B.data_ptr(), B._version, scaling, _OPTIMIZER_STEPS[0])
        cached = dora.__dict__.get("_lora_ft_norm")
        # a norm made under inference_mode cannot be saved for a backward pass: reused only in inference mode
        if cached is not None and cached[0] == key and (torch.is_inference_mode_enabled() or not cached[1].is_inference()):
            return cached[1]
    with torch.autocast("cpu", enabled=False):
        w = transpose(_frozen_weight(base_layer), dora.fan_in_fan_out)  # (out, in)
        w_sq = getattr(dora, "_lora_ft_w_sq", None)
        if w_sq is None or w_sq[0] != w_key:
            w_sq = (w_key, w.float().pow(2).sum(1))  # W is frozen: once per layer (again after a merge writes W)
            dora._lora_ft_w_sq = w_sq
        A, B = A.float(), B.float()
        wa = w @ A.to(w.dtype).T  # (out, r): the only weight-sized work, in the weight's own dtype
        cross = (wa.float() * B).sum(1)
        ba_sq = ((B @ (A @ A.T)) * B).sum(1)
        norm = (w_sq[1] + (2 * scaling) * cross + (scaling * scaling) * ba_sq).clamp_min(0).sqrt()
    if key is not None:
        dora._lora_ft_norm = (key, norm)
    return norm


def _frozen_weight(base_layer) -> torch.Tensor:
    """The base layer's weight in floating point. An 8-bit weight is dequantized from the layer's scales by peft's
    own helper, without the `module.weight = module.weight.to(device)` that peft's wrapper adds on CPU: that new
    Int8Params carries the int8 data but no scales, and the layer's next forward copies the missing scales into its
    matmul state (bitsandbytes 0.50: "'NoneType' object has no attribute 'unsqueeze'")."""
    from peft.utils.integrations import dequantize_bnb_weight, dequantize_module_weight

    weight = base_layer.weight
    qs = getattr(weight, "quant_state", None)
    if type(weight).__name__ == "Params4bit" and qs is not None and not getattr(qs, "packing_format_for_cpu", False):
        # peft's path also replaces the weight (so no cache could key on it) and uses bitsandbytes' native CPU
        # dequantization, which is wrong for rows that are not whole blocks
        from .linear4bit import dequantize_into_scratch

        return dequantize_into_scratch(weight, qs, torch.float32, _SCRATCH)
    if type(weight).__name__ == "Int8Params":
        return dequantize_bnb_weight(weight, state=base_layer.state)
    return dequantize_module_weight(base_layer)
