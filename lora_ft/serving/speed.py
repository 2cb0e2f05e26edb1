"""Serving speed levers, each a setting so that benchmarks/serve_load.py can time it alone.

- dtype: bf16 weights where bf16 matmuls are fast (AMX or AVX512-BF16 CPUs, CUDA with bf16; lora_ft/hardware.py
  decides), fp32 elsewhere: on AVX2 alone bf16 matmuls run >10x slower than fp32. Weights are cast once at load,
  not autocast per request: autocast re-casts every weight at every forward.
- inference_mode: torch.inference_mode instead of no_grad (no version counters or view tracking at all).
- group_by_length: a batch is split into runs of similar token counts where the padding saved outweighs the cost
  of another forward pass.
- threads: torch's intra-op threads (0: torch's default, one per core).
- backend: torch, or onnxruntime for merged models (lora_ft/serving/onnx_backend.py).

`--dtype float32 --no-inference-mode --no-group-by-length --threads 0` is the serving path before issue 21.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("auto", "bfloat16", "float32")
BACKENDS = ("torch", "onnx")
# One forward pass costs about OVERHEAD_TOKENS padded tokens' worth of work beyond its tokens (per-layer dispatch,
# python, thread hand-offs). Measured on the SmolLM2 tweet classifier, bf16 weights, 2 AMX cores (2026-12-02,
# load ~2.5): batch 1 of 9 tokens 119 ms; batch 32 padded to 16 tokens 342 ms, to 53 tokens 835 ms: ~0.42 ms a
# token plus ~110 ms a pass, i.e. ~260 tokens. In fp32 a token costs ~4x more, so the same constant splits less.
OVERHEAD_TOKENS = 260


@dataclass(frozen=True)
class Speed:
    dtype: str = "auto"
    inference_mode: bool = True
    group_by_length: bool = True
    threads: int = 0
    backend: str = "torch"

    def __post_init__(self):
        from ..errors import LoraFtError

        if self.dtype not in DTYPES:
            raise LoraFtError(f"serve: --dtype {self.dtype}: use one of {', '.join(DTYPES)}")
        if self.backend not in BACKENDS:
            raise LoraFtError(f"serve: --backend {self.backend}: use one of {', '.join(BACKENDS)}")
        if self.threads < 0:
            raise LoraFtError("serve: --threads must be 0 (torch's default) or more")


def resolved_dtype(speed: Speed) -> str:
    """bfloat16 or float32: what `auto` means on this machine (LORA_FT_CPU_CAPABILITY forces the CPU kind)."""
    if speed.dtype != "auto":
        return speed.dtype
    from .. import hardware

    return "bfloat16" if hardware.precision()[0] == "bf16" else "float32"


def cast(model, speed: Speed) -> str:
    """Cast a torch model's floating weights to the serving dtype once; returns the dtype it now computes in.
    Quantized (bitsandbytes) models keep their layout: their matmuls already run in bnb_4bit_compute_dtype."""
    import torch

    want = resolved_dtype(speed)
    if any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters()):
        return "quantized"
    if want == "bfloat16":
        model.to(torch.bfloat16)
    return want


def grad_off(speed: Speed):
    """The context every served forward runs in."""
    import torch

    return torch.inference_mode() if speed.inference_mode else torch.no_grad()


def apply_threads(speed: Speed) -> None:
    if speed.threads:
        import torch

        torch.set_num_threads(speed.threads)


def length_groups(lengths: list[int], overhead: int = OVERHEAD_TOKENS) -> list[list[int]]:
    """Indices of `lengths` in runs of similar length, minimising sum(overhead + size * longest) over the runs.
    Exact for that cost (dynamic programming over the sorted lengths: a best split never interleaves lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    srt = [lengths[i] for i in order]
    n = len(srt)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):  # best[j]: cheapest split of the j shortest; the last run is srt[i:j]
        for i in range(j):
            c = best[i] + overhead + (j - i) * srt[j - 1]
            if c < best[j]:
                best[j], cut[j] = c, i
    runs, j = [], n
    while j:
        runs.append(order[cut[j]:j])
        j = cut[j]
    return runs[::-1]


def predict_grouped(task, model, tok, texts: list, recipe, speed: Speed, batch_size: int) -> list[dict]:
    """task.predict over `texts` in batches of batch_size, or in runs of similar token counts (each again at most
    batch_size); rows come back in input order."""
    if not speed.group_by_length or len(texts) < 2:
        return task.predict(model, tok, texts, recipe, batch_size=batch_size)
    enc = task.encode(tok, texts, recipe.args, return_tensors=None)  # the task's own encoding: its token counts
    rows: list = [None] * len(texts)
    for run in length_groups([sum(m) for m in enc["attention_mask"]], OVERHEAD_TOKENS):
        for i, row in zip(run, task.predict(model, tok, [texts[i] for i in run], recipe, batch_size=batch_size)):
            rows[i] = row
    return rows
