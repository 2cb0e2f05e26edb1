"""Which distributed engine a run uses, and what this project's runs showed it does: one table for the doctor,
`lora-ft train`'s pre-flight and the README's scaling table.

The engine comes from the accelerate launch (the environment `accelerate launch` gives its processes), from
`lora-ft doctor RECIPE --accelerate_config FILE`, or from the recipe's own `fsdp` / `deepspeed` trainer keys.
Every verdict below was measured with 2 gloo processes on a 2-core CPU (2026-12-02, tests/test_scale_out.py and
the runs the README lists); on CUDA nothing here was run (no GPU in these sessions).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .errors import LoraFtError

ENGINES = ("ddp", "fsdp", "fsdp1", "zero2", "zero3")  # fsdp: FSDP2 (fully_shard); fsdp1: FullyShardedDataParallel
NAMES = {"ddp": "DDP", "fsdp": "FSDP2", "fsdp1": "FSDP1", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}
DEEPSPEED_INSTALL = "pip install 'lora-ft[deepspeed]'"


def from_environment(trainer_keys: Optional[dict] = None, env=os.environ) -> Optional[str]:
    """fsdp, fsdp1, zero2, zero3 or None, from the recipe's trainer keys or the accelerate launch environment."""
    t = trainer_keys or {}
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp" if env.get("FSDP_VERSION", "1") == "2" else "fsdp1"  # accelerate's own default is 1
    if t.get("fsdp"):
        c = t.get("fsdp_config") or {}
        return "fsdp" if str(c.get("version", c.get("fsdp_version", 1))) == "2" else "fsdp1"
    if t.get("deepspeed") or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        return "zero3" if stage == "3" or "zero3" in str(t.get("deepspeed", "")) else "zero2"
    return None


def from_accelerate_config(path: str) -> Optional[str]:
    """The engine an accelerate config file launches: ddp, fsdp, zero2, zero3, or None for one process."""
    import yaml

    p = Path(path)
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise LoraFtError(f"--accelerate_config {path}: cannot read it ({str(e).splitlines()[0]})") from None
    kind = str(cfg.get("distributed_type", "NO")).upper()
    if kind == "FSDP":
        return "fsdp" if str((cfg.get("fsdp_config") or {}).get("fsdp_version", 1)) == "2" else "fsdp1"
    if kind == "DEEPSPEED":
        stage = (cfg.get("deepspeed_config") or {}).get("zero_stage")
        if stage not in (2, 3):
            raise LoraFtError(f"--accelerate_config {path}: deepspeed_config.zero_stage {stage!r}; lora_ft checks stages 2 and 3")
        return f"zero{stage}"
    if kind in ("MULTI_GPU", "MULTI_CPU"):
        return "ddp"
    if kind == "NO":
        return None
    raise LoraFtError(f"--accelerate_config {path}: distributed_type {kind} is not one of NO, MULTI_GPU, MULTI_CPU, FSDP, DEEPSPEED")


def verdict(engine: str, config, cuda: bool) -> tuple[str, str]:
    """(pass|fail, why) for `engine` with this model config; quantization with an engine is the doctor's
    `quantization` check. The reasons are what the runs showed; a refusal names what to use instead."""
    name = NAMES[engine]
    if engine in ("zero2", "zero3") and not _deepspeed_installed():
        return "fail", f"{name}: deepspeed is not installed; {DEEPSPEED_INSTALL} (CPU: its CPU accelerator over gloo)"
    if engine == "fsdp" and getattr(config, "is_encoder_decoder", False) and getattr(config, "tie_word_embeddings", False):
        return "fail", (f"{name} with an encoder-decoder whose embeddings are tied ({config.model_type}): at the first step "
                        "fully_shard refuses the shared embedding ('shared with a parameter already managed by another FSDP "
                        "group'); use DDP or DeepSpeed ZeRO")
    if engine == "fsdp1" and not cuda:
        return "fail", (f"{name} on CPU: accelerate's FSDP1 path needs an accelerator device (it raises 'There are currently "
                        "no available devices found'); on CPU use FSDP2, recipes/accelerate/fsdp_cpu.yaml (fsdp_version: 2)")
    if engine == "fsdp" and not cuda:
        from . import upstream

        upstream.patches()
        why = upstream.problem("cpu_fsdp")
        if why:
            return "fail", (f"{name} on CPU: accelerate alone would train these processes as DDP, and lora_ft's adjustment "
                            f"(lora_ft/cpu/fsdp.py) is off: {why}; use recipes/accelerate/multi_cpu.yaml for DDP")
    where = "on CUDA (not run on a GPU in this project)" if cuda else "on CPU processes over gloo (ran here)"
    return "pass", f"{name} {where}"


def _deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None
