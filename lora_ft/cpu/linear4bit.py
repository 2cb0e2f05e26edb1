"""bitsandbytes 4-bit linear layers trained on CPU: outputs in the autocast dtype, one dequantization buffer per shape.

bitsandbytes 0.50 trains a Linear4bit on CPU through its generic path (its fused CPU kernel is inference-only and
comes from the Hub through the `kernels` package). Measured on a SmolLM2-1.7B-shaped model, 2 x 256 tokens per step:
- the layer casts its bf16 output back to the input's dtype; k-bit preparation keeps the residual stream in fp32,
  so under bf16 autocast the MLP's 8,192-wide activations were saved for backward in fp32 (1.15 GB of 2.4 GB).
  Here the output keeps the autocast dtype, as an `nn.Linear` under autocast does: step peak -0.8 GB.
- every forward and every backward dequantized the weight into a new tensor; here each weight shape has one buffer
  that is dequantized into and reused (about 15% faster steps on that model).
Only the frozen weight's gradient path is replaced: the input gradient is grad_out @ W, as in bitsandbytes.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import types

import torch

from .. import upstream

_DTYPE_SUFFIX = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _relies_on():
    """The bitsandbytes internals this forward calls (private: they may move between releases)."""
    import bitsandbytes as bnb
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib  # noqa: F401
    from bitsandbytes.functional import QuantState

    return upstream.first_problem(
        upstream.expect_attrs(bnb.nn.Linear4bit, "set_compute_type"),
        None if "compute_type_is_set" in inspect.getsource(bnb.nn.Linear4bit.__init__) else "Linear4bit sets no compute_type_is_set",
        upstream.expect_attrs(torch.ops.bitsandbytes, "dequantize_blockwise"),
        upstream.expect_params(_dequantize_4bit_compute, "A_flat", "absmax", "code", "blocksize", "shape", "dtype"),
        upstream.expect_params(_get_4bit_code, "quant_type", "device"),
        None if {"absmax", "shape", "blocksize", "quant_type", "offset", "state2"} <= set(inspect.signature(QuantState).parameters)
        else "QuantState's fields changed",
    )


upstream.register(upstream.Patch("cpu_linear4bit", "bitsandbytes", "4-bit CPU training forward", _relies_on))


def install(model) -> int:
    """Give every bitsandbytes Linear4bit of `model` the CPU training forward. Returns how many layers got it (0 where
    the installed bitsandbytes is not the one this was written against: its own forward then runs)."""
    import bitsandbytes as bnb

    if not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) or not upstream.usable("cpu_linear4bit"):
        return 0
    scratch: dict = {}  # (out_features, in_features, dtype) -> buffer; one per model, shared by its layers
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.forward = types.MethodType(_make_forward(type(m).forward, scratch), m)
            n += 1
    return n


def _make_forward(bnb_forward, scratch: dict):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qs = getattr(self.weight, "quant_state", None)
        if (x.device.type != "cpu" or qs is None or getattr(qs, "packing_format_for_cpu", False)
                or (self.bias is not None and self.bias.requires_grad) or self.weight.requires_grad):
            return bnb_forward(self, x)
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        in_dtype = x.dtype
        autocast = torch.is_autocast_enabled("cpu")
        # Under autocast the matmul runs in the autocast dtype whatever compute_dtype says (fp32 for an fp32 input):
        # dequantizing straight into it saves autocast a weight-sized cast per call.
        dtype = torch.get_autocast_dtype("cpu") if autocast else (self.compute_dtype or in_dtype)
        x = x.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        out = _Dequantized4bitLinear.apply(x, self.weight, qs, bias, scratch)
        if autocast and self.training:
            # what nn.Linear returns under autocast: the activations saved downstream stay half-size. In eval mode
            # the output keeps bitsandbytes' dtype, so train-time eval scores are the ones `lora-ft predict` gives.
            # (self.training, not grad mode: reentrant checkpointing reruns a no-grad forward with grad on.)
            return out
        return out.to(in_dtype)

    return forward


class _Dequantized4bitLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized into a reused buffer in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, weight, quant_state, bias, scratch):
        ctx.weight, ctx.quant_state, ctx.scratch = weight, quant_state, scratch
        return torch.nn.functional.linear(x, dequantize_into_scratch(weight, quant_state, x.dtype, scratch), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the buffer is overwritten: no graph may keep it
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_into_scratch(ctx.weight, ctx.quant_state, grad_out.dtype, ctx.scratch)
        return grad_x, None, None, None, None


def dequantize_into_scratch(weight, qs, dtype: torch.dtype, scratch: dict) -> torch.Tensor:
    """The [out, in] weight in `dtype`, written into this shape's buffer in `scratch`: valid until the next call."""
    n_out, n_in = qs.shape
    absmax = qs.absmax
    if qs.nested:  # the per-block scales are themselves 8-bit: recover them (1/64 of the weight's size)
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            qs.absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize, torch.float32) + qs.offset
    absmax = absmax.float().contiguous()
    kernel = _kernel(qs.quant_type, dtype, qs.blocksize, n_in)
    if kernel is None:
        return _dequantize_generic(weight, absmax, qs, dtype)
    out = scratch.get((n_out, n_in, dtype))
    if out is None:
        out = scratch[(n_out, n_in, dtype)] = torch.empty((n_out, n_in), dtype=dtype)
    packed = weight.data.view(torch.uint8).reshape(n_out, n_in // 2)
    kernel(_ptr(packed), _ptr(absmax), _ptr(out), ctypes.c_longlong(qs.blocksize),
           ctypes.c_longlong(n_out), ctypes.c_longlong(n_in))
    return out


@functools.lru_cache(maxsize=None)
def _kernel(quant_type: str, dtype: torch.dtype, blocksize: int, n_in: int):
    """bitsandbytes' native CPU dequantization into a given buffer, where it is right: its rows must be whole blocks
    (measured with bitsandbytes 0.50: rows of 96 in blocks of 64 come out wrong, max error 1.95 vs 0.45)."""
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    if (isinstance(lib, ErrorHandlerMockBNBNativeLibrary) or blocksize >= 2048 or n_in % blocksize
            or dtype not in _DTYPE_SUFFIX):
        return None
    return getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{_DTYPE_SUFFIX[dtype]}", None)


def _dequantize_generic(weight, absmax, qs, dtype):
    """bitsandbytes' pure-torch dequantization (a new tensor each call), for layouts the native kernel gets wrong."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    code = _get_4bit_code(qs.quant_type, weight.device)
    return _dequantize_4bit_compute(weight.data.view(torch.uint8).reshape(-1), absmax, code, qs.blocksize,
                                    tuple(qs.shape), dtype)


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())
