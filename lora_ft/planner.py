"""`lora-ft plan`: predicted peak memory per setting (full, LoRA, 8-bit, 4-bit; batch and accumulation; checkpointing)
and the first setting that fits a memory budget, keeping the recipe's effective batch size."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import LoraFtError
from .memory import Estimate, activation_bytes, estimate, head_kind, weight_bytes

MODES = ("lora", "qlora8", "qlora4", "full")
OVERRIDES = {"lora": [], "qlora8": ["--load_in_8bit", "true"], "qlora4": ["--load_in_4bit", "true"], "full": ["--use_peft", "false"]}


@dataclass
class Setting:
    mode: str
    batch: int
    accumulation: int
    checkpointing: bool
    est: Estimate

    def overrides(self) -> list[str]:
        out = OVERRIDES[self.mode] + ["--per_device_train_batch_size", str(self.batch), "--gradient_accumulation_steps", str(self.accumulation)]
        return out + (["--gradient_checkpointing", "true"] if self.checkpointing else [])


def parse_size(text: str) -> float:
    """'24GiB', '24GB', '16g', '512MiB' -> GiB."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise LoraFtError(f"memory size '{text}': write it like 24GiB or 512MiB")
    return float(m.group(1)) * {"k": 2**-20, "m": 2**-10, "g": 1, "t": 2**10, "": 1}[m.group(2)]


def settings_for(recipe, config, cuda: bool) -> list[Setting]:
    a, t = recipe.args, recipe.trainer
    batch = int(t.get("per_device_train_batch_size", 8))
    accum = int(t.get("gradient_accumulation_steps", 1))
    dtype_bytes = weight_bytes(a)
    act_bytes = activation_bytes(t)
    lm_head = head_kind(a.task)
    out = []
    from .memory import count_params

    total = count_params(config)
    for ckpt in (False, True):
        b, k = batch, accum
        while b >= 1:
            for mode in MODES:
                est = estimate(config, batch_size=b, seq_len=a.max_length, mode=mode, lora_r=a.lora_r, dtype_bytes=dtype_bytes,
                               gradient_checkpointing=ckpt, lm_head=lm_head, act_bytes=act_bytes, cuda=cuda, total_params=total)
                out.append(Setting(mode, b, k, ckpt, est))
            b, k = b // 2, k * 2
    return out


def propose(settings: list[Setting], budget_gb: float, wanted_mode: str) -> Setting | None:
    """The recipe's own mode first, then lighter ones; the biggest batch first; checkpointing last."""
    order = [wanted_mode] + [m for m in ("lora", "qlora8", "qlora4") if m != wanted_mode]
    for ckpt in (False, True):
        for s in sorted((s for s in settings if s.checkpointing == ckpt), key=lambda s: (-s.batch, order.index(s.mode) if s.mode in order else 9)):
            if s.mode in order and s.est.total_gb <= budget_gb:
                return s
    return None
