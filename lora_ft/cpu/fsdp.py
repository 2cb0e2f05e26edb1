"""FSDP on CPU processes: accelerate's FSDP plugin over gloo, where accelerate itself would run DDP.

accelerate 1.15 turns on FSDP only for accelerator devices: a process that trains on the CPU (`use_cpu`, which
lora_ft sets where there is no CUDA) gets the MULTI_CPU (DDP) type, and the FSDP plugin that `accelerate launch`
configured is dropped without a word. PyTorch's FSDP2 (`fully_shard`) itself runs on CPU over gloo, and so does
accelerate's FSDP2 preparation, checkpointing and state-dict gathering once the state says FSDP. This patch says
so: when accelerate was launched with FSDP and the process state is MULTI_CPU, the state becomes FSDP with the
plugin it was given. Measured here (2 CPU processes, tiny Llama classifier): per-step losses equal the DDP run's.
"""

from __future__ import annotations

import functools
import os

from .. import upstream
from ..errors import LoraFtError


def _relies_on():
    import inspect

    from accelerate.state import AcceleratorState, DistributedType, PartialState

    params = list(inspect.signature(AcceleratorState.__init__).parameters)
    return upstream.first_problem(
        None if "fsdp_plugin" in params else "AcceleratorState.__init__ takes no fsdp_plugin",
        upstream.expect_attrs(DistributedType, "MULTI_CPU", "FSDP"),
        upstream.expect_attrs(PartialState, "_shared_state"),
    )


upstream.register(upstream.Patch("cpu_fsdp", "accelerate", "FSDP on CPU processes over gloo", _relies_on))


def wanted() -> bool:
    """accelerate launched this process with FSDP and it will train on the CPU."""
    import torch

    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not torch.cuda.is_available()


def install() -> None:
    """Let accelerate's FSDP plugin take effect on CPU processes; refuse (never fall back to DDP) if it cannot."""
    if not upstream.usable("cpu_fsdp"):
        raise LoraFtError(f"FSDP on CPU: lora_ft's accelerate adjustment is off ({upstream.problem('cpu_fsdp')}), and accelerate "
                          "alone would train DDP instead; use recipes/accelerate/multi_cpu.yaml for DDP, or a GPU for FSDP")
    _patch()


@functools.lru_cache(maxsize=None)
def _patch() -> None:
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    real = AcceleratorState.__init__

    @functools.wraps(real)
    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        real(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            # As accelerate does for its own types: every later AcceleratorState() re-reads PartialState's.
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = __init__
