"""Serving speed levers, each a setting so that benchmarks/serve_load.py can time it alone.

- dtype: bf16 weights where bf16 matmuls are fast (AMX or AVX512-BF16 CPUs, CUDA with bf16; lora_ft/hardware.py
  decides), fp32 elsewhere: on AVX2 alone bf16 matmuls run >10x slower than fp32. Weights are cast once at load,
  not autocast per request: autocast re-casts every weight at every forward. `int8` (opt-in): the base model's
  large, non-narrowing Linear layers dynamically quantized to int8 (torch's fbgemm/x86 kernels, weights per output channel,
  activations per batch), for CPUs where bf16 is slow; LoRA matrices and the classifier head stay fp32. It is
  lossy: benchmarks/serve_load.py counts the labels it changes against `lora-ft predict`.
- merge: a labelling run that has its base to itself is merged into it at load, in fp32 and in memory (peft's
  merge_and_unload; nothing is written), so a forward runs no LoRA or DoRA path. 4-/8-bit bases are not merged. Runs that share a base keep
  their adapters (one copy of the base serves them all); generation keeps the adapter as `lora-ft generate` does.
- inference_mode: torch.inference_mode instead of no_grad (no version counters or view tracking at all).
- group_by_length: a batch is split into runs of similar token counts where the padding saved outweighs the cost
  of another forward pass.
- threads: torch's intra-op threads (0: torch's default, one per core).
- backend: torch, or onnxruntime for merged models (lora_ft/serving/onnx_backend.py).

`--dtype float32 --no-merge --no-inference-mode --no-group-by-length --threads 0` is the serving path before issue 21.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("auto", "bfloat16", "float32", "int8")
# Linear layers with a side under this stay fp32 under int8: LoRA's rank-r matrices and classifier heads (a few
# labels wide) are cheap, and the head alone decides the label.
INT8_MIN_FEATURES = 64
BACKENDS = ("torch", "onnx")
# One forward pass costs about OVERHEAD_TOKENS padded tokens' worth of work beyond its tokens (per-layer dispatch,
# python, thread hand-offs). Measured on the SmolLM2 tweet classifier, bf16 weights, 2 AMX cores (2026-12-02,
# load ~2.5): batch 1 of 9 tokens 119 ms; batch 32 padded to 16 tokens 342 ms, to 53 tokens 835 ms: ~0.42 ms a
# token plus ~110 ms a pass, i.e. ~260 tokens. In fp32 a token costs ~4x more, so the same constant splits less.
OVERHEAD_TOKENS = 260


@dataclass(frozen=True)
class Speed:
    dtype: str = "auto"
    merge: bool = True
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
    if bnb_quantized(model):
        return "quantized"
    if want == "int8":
        quantize_int8(model)
        return "int8"
    if want == "bfloat16":
        model.to(torch.bfloat16)
    return want


def bnb_quantized(model) -> bool:
    """Whether the model holds bitsandbytes 4-/8-bit weights."""
    return any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters())


def mergeable(model, speed: Speed) -> bool:
    """Whether `merge` folds this group's one adapter into its base: never into 4-/8-bit weights, where peft's merge
    re-quantizes W + BA and so changes the model (`lora-ft merge` dequantizes and verifies instead)."""
    return speed.merge and not bnb_quantized(model)


def int8_shape(in_features: int, out_features: int) -> bool:
    """Whether int8 takes a weight of this shape: both sides at least INT8_MIN_FEATURES, and not narrowing (see
    int8_layers). The torch path and the onnx one (onnx_backend.int8_graph) both ask here."""
    return min(in_features, out_features) >= INT8_MIN_FEATURES and in_features <= out_features


def int8_layers(model) -> set[str]:
    """Names of the Linear layers int8 takes: the base model's (inside peft's wrappers, their base_layer), both sides
    at least INT8_MIN_FEATURES and not narrowing, never a LoRA matrix or a modules_to_save copy."""
    import torch

    # Narrowing layers (MLP down projections) stay fp32 too: their input, the activated intermediate, carries the
    # outliers that one int8 scale per batch flattens. Measured on the SmolLM2 tweet classifier, 64 tweets, AVX2:
    # all Linear layers int8 changed 6 labels of 64, these kept fp32 changed 2, at about the same speed.
    return {name for name, mod in model.named_modules()
            if type(mod) is torch.nn.Linear and int8_shape(mod.in_features, mod.out_features)
            and not any(part.startswith("lora_") or part in ("modules_to_save", "original_module") for part in name.split("."))}


def quantize_int8(model) -> None:
    """Swap int8_layers(model) for torch's dynamically quantized Linear, in place. Unmerged DoRA is refused: its
    forward reads the base weight, which an int8 layer no longer holds as a float tensor (merged, it is plain)."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from ..errors import LoraFtError

    if any("lora_magnitude_vector" in name for name, _ in model.named_parameters()):
        raise LoraFtError("serve --dtype int8: DoRA adapters on a shared base read its weight; serve the run alone (it is "
                          "merged at load), or with --dtype auto or float32")
    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = "x86" if "x86" in engines else "fbgemm" if "fbgemm" in engines else engines[-1]
    names = int8_layers(model)
    if not names:  # GPT-2's projections are transformers' Conv1D, not Linear; tiny models are narrower than the floor
        raise LoraFtError(f"serve --dtype int8: the model has no Linear layer at least {INT8_MIN_FEATURES} wide on both sides "
                          "to quantize; serve it with --dtype auto or float32")
    quantize_dynamic(model, dict.fromkeys(names, per_channel_dynamic_qconfig), inplace=True)


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
