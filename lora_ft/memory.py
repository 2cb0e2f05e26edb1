"""Peak training memory from a model config alone: weights, adapter + optimizer states, activations, logits.

A coarse, documented model (the doctor warns with it; `lora-ft plan` proposes settings with it):
- weights: parameters x bytes per parameter (4-bit 0.5 + quantization constants, 8-bit 1, bf16 2, fp32 4);
  embeddings and heads stay 16-bit under bitsandbytes.
- trainable state: LoRA parameters (all-linear, rank r) or all parameters for full fine-tuning: fp32 gradient and two
  Adam moments (12 bytes), plus an fp32 master copy (4 more) when the weights themselves are stored in 16 bits. The
  gradients fill memory the activations free during backward, so they count only beyond the activations.
- activations: per layer about 34 x tokens x hidden bytes in 16-bit, twice that in fp32 (the run's precision:
  activation_bytes) (Korthikanti et al. 2022, no recomputation; preference pairs: PAIRED_ACT_FACTOR more),
  a sqrt(layers)-th of that with gradient checkpointing; plus the LM head's logits: seq2seq materializes them all
  in fp32 with their gradient (tokens x vocab x 8); causal-LM training (trl's chunked head on GPUs, lora_ft's CPU
  head) holds one tile at a time (CPU: 1,024 tokens x vocab in fp32 and its exp; CUDA: 4,096 x 32,768 in bf16,
  two buffers).
- runtime on CPU: a fixed 1.3 GiB, fit to the measured peaks of benchmarks/memory_plan.py on a 2-core x86-64
  machine (refit 2026-12-01 after the CPU LM head and no-dropout default lowered the peaks; 1.8 GiB before).
  A process holds about 0.4-0.5 GiB after importing torch, transformers, peft and datasets; the rest is allocator
  slack and step temporaries (bf16 casts, dequantization) that the activation term misses.
  None is counted on CUDA, where the peak is allocated tensor memory.
"""

from __future__ import annotations

from dataclasses import dataclass


CPU_RUNTIME_GB = 1.3  # see the module docstring: fit to benchmarks/memory_plan.py


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


def recipe_mode(args) -> str:
    """The estimate's mode for a recipe: full, qlora4, qlora8 or lora."""
    return "full" if not args.use_peft else "qlora4" if args.load_in_4bit else "qlora8" if args.load_in_8bit else "lora"


def weight_bytes(args) -> int:
    """Bytes per stored weight that was not quantized, from the recipe's `dtype`."""
    return 4 if args.dtype in ("float32", "auto") else 2


def activation_bytes(trainer: dict) -> int:
    """Bytes per activation value: 2 where the run autocasts to bf16/fp16 (the recipe says so, or leaves bf16 out on
    hardware lora_ft trains in bf16), 4 in fp32 (CPUs without native bf16)."""
    from .hardware import fill_bf16

    t = fill_bf16(dict(trainer))
    return 2 if t.get("bf16") or t.get("fp16") else 4


def head_kind(task: str) -> str:
    """How a task's training computes logits: none (a classifier head), chunked (causal LM), full (seq2seq) or
    paired-reference (preference: two chunked sequences per example and a reference pass)."""
    from .tasks import get_task

    return get_task(task).MEMORY_HEAD


def _logit_bytes(kind: str, tokens: int, vocab: int, cuda: bool) -> float:
    if kind == "none":
        return 0
    if kind == "full":
        return tokens * vocab * 8
    return min(tokens, 4096) * min(vocab, 32768) * 4 if cuda else min(tokens, 1024) * vocab * 8


# Preference training ("paired-reference"): each example is two sequences (chosen, rejected) through the policy, then
# through the reference (the same weights, adapter off) without gradients. That pass holds one layer's temporaries
# at a time (~8 x tokens x hidden 16-bit values) and one logits tile, freed before the policy's backward.
PAIRED_KINDS = ("paired-reference",)
# The paired policy pass holds more per token than the 34 x hidden bytes per layer of a plain one. Fit (not broken
# down) to benchmarks/memory_plan.py's dpo rows, SmolLM2-135M, batch 2 and 8 x 512, fp32 on an AVX2-only EPYC
# (2026-12-02): measured 2,030 MiB a pair against 1,148 modeled. With it both rows are within 11%. Not fit: a full
# bf16-autocast run on AMX (recipes/smollm2_dpo.yaml, batch 8) held 14.8 GB after its first steps (this estimate
# is 27% under), and grew to a 21.8 GB peak over the run (benchmarks/results/dpo_hh.json; growth not modeled).
PAIRED_ACT_FACTOR = 1.75


def estimate(config, *, batch_size: int, seq_len: int, mode: str = "lora", lora_r: int = 16, dtype_bytes: int = 2,
             gradient_checkpointing: bool = False, lm_head: str = "full", act_bytes: int = 2, cuda: bool = False,
             total_params: int | None = None) -> Estimate:
    """mode: full, lora, qlora8 or qlora4. dtype_bytes: stored weights; act_bytes: activations (2 under bf16 autocast);
    lm_head: see head_kind."""
    hidden, layers, vocab, inter = _dims(config)
    total = total_params if total_params is not None else count_params(config)
    embed = vocab * hidden
    body = max(total - embed, 0)
    per_param = {"full": dtype_bytes, "lora": dtype_bytes, "qlora8": 1.0, "qlora4": 0.5 + 0.5 / 32}[mode]
    weights = body * per_param + embed * dtype_bytes
    # all-linear LoRA: q,k,v,o (4 x hidden in/out) + gate/up/down (hidden <-> inter), A and B of rank r each
    lora = layers * lora_r * (4 * 2 * hidden + 3 * (hidden + inter))
    trainable = total if mode == "full" else lora
    tokens = batch_size * seq_len * (2 if lm_head in PAIRED_KINDS else 1)
    acts = 34 * tokens * hidden * layers * act_bytes / 2 * (PAIRED_ACT_FACTOR if lm_head in PAIRED_KINDS else 1)
    if gradient_checkpointing:
        acts /= max(layers**0.5, 1)
    logits = _logit_bytes("chunked" if lm_head in PAIRED_KINDS else lm_head, tokens, vocab, cuda)
    if lm_head in PAIRED_KINDS:  # the reference pass, transient but counted at the peak it reaches beside the acts
        logits += 8 * tokens * hidden * act_bytes
    gb = 2**30
    state_bytes = 12 if (mode != "full" or dtype_bytes == 4) else 16  # LoRA params are fp32; full FT in 16-bit keeps a master copy
    runtime = 0.0 if cuda else CPU_RUNTIME_GB
    # Gradients are allocated during backward as activations are freed (set_to_none between steps): they add to the
    # peak only beyond the activations. The moments (and master copy) persist across steps.
    state = trainable * (state_bytes - 4) + max(0.0, trainable * 4 - (acts + logits))
    return Estimate(weights / gb, state / gb, (acts + logits) / gb, runtime, trainable, total)


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
