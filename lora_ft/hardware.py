"""What this machine can do: bf16 support, device, peak memory. One place that asks the hardware."""

from __future__ import annotations

import functools
import os
import platform
import resource
import sys


CAPABILITY_ENV = "LORA_FT_CPU_CAPABILITY"  # amx, avx512_bf16, avx512 or avx2: what lora_ft takes this CPU to do
CAPABILITIES = ("amx", "avx512_bf16", "avx512", "avx2", "other")  # best first
FAST_BF16 = ("amx", "avx512_bf16")  # bf16 matmul several times fp32's; on AVX2 alone bf16 is >10x slower than fp32


@functools.lru_cache(maxsize=None)
def cpu_info() -> dict:
    """The CPU's model name and flags, from /proc/cpuinfo (empty where there is none)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(), "flags": frozenset(flags)}


def detected_capability() -> str:
    flags = cpu_info()["flags"]
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "other"


def cpu_capability() -> str:
    """The CPU capability lora_ft decides from: detected, or forced with LORA_FT_CPU_CAPABILITY (tests force each
    kind on any machine; a benchmark can time an AMX machine as if it had AVX2 only, with torch told the same)."""
    forced = os.environ.get(CAPABILITY_ENV, "").strip().lower()
    if forced:
        if forced not in CAPABILITIES:
            from .errors import LoraFtError

            raise LoraFtError(f"{CAPABILITY_ENV}={forced}: not one of {', '.join(CAPABILITIES)}; unset it to detect the CPU")
        return forced
    return detected_capability()


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmul is several times faster than fp32 on such CPUs."""
    return cpu_capability() in FAST_BF16


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def bf16_supported() -> bool:
    return precision()[0] == "bf16"


def fill_bf16(trainer: dict) -> dict:
    """lora_ft's precision default, filled into trainer keys that leave bf16 (and fp16) out: bf16 wherever the
    hardware trains in it (precision()). Training and the memory estimate both read it from here."""
    if "bf16" not in trainer and not trainer.get("fp16"):
        trainer["bf16"] = bf16_supported()
    return trainer


def precision() -> tuple[str, str]:
    """(the precision lora_ft trains in when the recipe leaves bf16 out, why)."""
    import torch

    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16", f"CUDA device {torch.cuda.get_device_name(0)} supports bf16"
        return "fp32", f"CUDA device {torch.cuda.get_device_name(0)} has no bf16"
    cap = cpu_capability()
    forced = f" ({CAPABILITY_ENV})" if os.environ.get(CAPABILITY_ENV) else ""
    if cap in FAST_BF16:
        return "bf16", f"CPU with {cap}{forced}: bf16 autocast over fp32 weights, matmuls several times faster"
    return "fp32", f"CPU with {cap}{forced}: no native bf16, where bf16 matmuls run >10x slower than fp32"


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> float:
    """Peak GPU memory allocated when on CUDA, else the process's peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return process_peak_rss_mb()


def process_peak_rss_mb() -> float:
    """This process's own peak resident set size. On Linux from VmHWM: ru_maxrss carries the parent's peak over
    fork + exec, so a small run started from a big process (a notebook, a benchmark that built a model) reports the
    parent's."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 1024 if sys.platform != "darwin" else rss / 2**20
