"""Task registry: every task difference is reached through the module registered here.

A task module implements the protocol in `lora_ft/tasks/base.py` (`TaskModule`): data preparation, model class and
kwargs, head, trainer-arguments class, collator, trainer, metrics and the metric to select on; the one inference
encoding (eval, predict, merge verification, serve, export checks); the predict output; merge verification inputs
and logits; the ONNX export graph; the Hub pipeline tag, auto classes and usage snippet; the default search space,
the compress metric; the serving routes and the architectures a plain model folder is served as; the memory
model's head kind and the doctor's head checks.

Adding a task takes one module and one line below: its name, its module and its trainer-arguments kind
(a key of `lora_ft.trainer_keys.CLASSES`). Names only: modules are imported when first asked for, so
`lora_ft.config` can read `TASKS` without torch.
"""

from __future__ import annotations

import importlib
from typing import Optional

_REGISTRY = {  # task name: (module, trainer-arguments kind)
    "sequence-classification": ("lora_ft.tasks.classification", "training"),
    "causal-lm": ("lora_ft.tasks.causal_lm", "sft"),
    "seq2seq": ("lora_ft.tasks.seq2seq", "seq2seq_training"),
    "token-classification": ("lora_ft.tasks.token_classification", "training"),
}
TASKS = tuple(_REGISTRY)
DEFAULT_TASK = TASKS[0]


def trainer_kind(name: str) -> str:
    return _REGISTRY[name][1]


def get_task(name: str):
    if name not in _REGISTRY:
        from ..errors import LoraFtError

        raise LoraFtError(f"task: '{name}' is not one of {', '.join(TASKS)}")
    return importlib.import_module(_REGISTRY[name][0])


def task_for_architectures(architectures) -> Optional[str]:
    """The task whose ARCHITECTURES ends one of a config's `architectures` names (a plain HF folder), or None."""
    for arch in architectures or ():
        for name in TASKS:
            if str(arch).endswith(get_task(name).ARCHITECTURES):
                return name
    return None


def auto_class(task_module):
    import transformers

    return getattr(transformers, task_module.AUTO_CLASS)
