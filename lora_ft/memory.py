"""Peak training memory from a model config alone: weights, adapter + optimizer states, activations, logits.

A coarse, documented model (the doctor warns with it; `lora-ft plan` proposes settings with it):
- weights: parameters x bytes per parameter (4-bit 0.5 + quantization constants, 8-bit 1, bf16 2, fp32 4);
  embeddings and heads stay 16-bit under bitsandbytes.
- trainable state: LoRA parameters (all-linear, rank r) or all parameters for full fine-tuning: fp32 gradient and two
  Adam moments (12 bytes), plus an fp32 master copy (4 more) when the weights themselves are stored in 16 bits.
- activations: per layer about 34 x tokens x hidden bytes in 16-bit (Korthikanti et al. 2022, no recomputation),
  a sqrt(layers)-th of that with gradient checkpointing; plus fp32 logits and their gradient (tokens x vocab x 8) for
  LM heads.
- runtime on CPU: a fixed 1.8 GiB, fit to the measured peaks of benchmarks/memory_plan.py on a 2-core x86-64
  machine (2026-11-30). A process holds about 0.5-0.75 GiB after importing torch, transformers, peft and datasets;
  the rest is allocator slack and step temporaries (bf16 casts, dequantization) that the activation term misses.
  None is counted on CUDA, where the peak is allocated tensor memory.
"""

from __future__ import annotations

from dataclasses import dataclass


CPU_RUNTIME_GB = 1.8  # see the module docstring: fit to benchmarks/memory_plan.py


@dataclass
class Estimate:
    weights_gb: float
    trainable_gb: float
    activations_gb: float
    runtime_gb: float
    trainable_params: int
    total_params: int

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.trainable_gb + self.activations_gb + self.runtime_gb


def _dims(config) -> tuple[int, int, int, int]:
    """(hidden, layers, vocab, intermediate) across config spellings (Llama, GPT-2, BERT, T5)."""
    g = lambda *names, default=0: next((getattr(config, n) for n in names if getattr(config, n, None)), default)  # noqa: E731
    hidden = g("hidden_size", "n_embd", "d_model")
    layers = g("num_hidden_layers", "n_layer", "num_layers") + g("num_decoder_layers")
    vocab = g("vocab_size")
    inter = g("intermediate_size", "n_inner", "d_ff", default=4 * hidden)
    return hidden, layers, vocab, inter


def count_params(config) -> int:
    """Parameters of the model a config describes, counted on the meta device (no memory)."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def estimate(config, *, batch_size: int, seq_len: int, mode: str = "lora", lora_r: int = 16, dtype_bytes: int = 2,
             gradient_checkpointing: bool = False, lm_head: bool = True, act_bytes: int = 2, cuda: bool = False,
             total_params: int | None = None) -> Estimate:
    """mode: full, lora, qlora8 or qlora4. dtype_bytes: stored weights; act_bytes: activations (2 under bf16 autocast)."""
    hidden, layers, vocab, inter = _dims(config)
    total = total_params if total_params is not None else count_params(config)
    embed = vocab * hidden
    body = max(total - embed, 0)
    per_param = {"full": dtype_bytes, "lora": dtype_bytes, "qlora8": 1.0, "qlora4": 0.5 + 0.5 / 32}[mode]
    weights = body * per_param + embed * dtype_bytes
    # all-linear LoRA: q,k,v,o (4 x hidden in/out) + gate/up/down (hidden <-> inter), A and B of rank r each
    lora = layers * lora_r * (4 * 2 * hidden + 3 * (hidden + inter))
    trainable = total if mode == "full" else lora
    tokens = batch_size * seq_len
    acts = 34 * tokens * hidden * layers * act_bytes / 2
    if gradient_checkpointing:
        acts /= max(layers**0.5, 1)
    logits = tokens * vocab * 8 if lm_head else 0
    gb = 2**30
    state_bytes = 12 if (mode != "full" or dtype_bytes == 4) else 16  # LoRA params are fp32; full FT in 16-bit keeps a master copy
    return Estimate(weights / gb, trainable * state_bytes / gb, (acts + logits) / gb, 0.0 if cuda else CPU_RUNTIME_GB, trainable, total)


def device_memory_gb() -> tuple[str, float]:
    """(what, GiB) the run can use: the first GPU's total memory, else this machine's available RAM."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            kb = next(int(ln.split()[1]) for ln in fh if ln.startswith("MemAvailable:"))
        return "RAM available", kb / 2**20
    except (OSError, StopIteration):
        return "RAM (unknown)", float("inf")
