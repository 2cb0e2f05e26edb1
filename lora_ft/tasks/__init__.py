"""Task registry: every task difference is reached through the module registered here.

A task module implements the protocol in `lora_ft/tasks/base.py` (`TaskModule`): data preparation, model class and
kwargs, head, trainer-arguments class, collator, trainer, metrics and the metric to select on; the one inference
encoding (eval, predict, merge verification, serve, export checks); the predict output; merge verification inputs
and logits; the ONNX export graph; the Hub pipeline tag, auto classes and usage snippet; the default search space,
the compress metric; the serving routes and the architectures a plain model folder is served as; the memory
model's head kind and the doctor's head checks.

Adding a task takes one module and one line below: its name, its module and its trainer-arguments kind
(a key of `lora_ft.trainer_keys.CLASSES`, or None when the module picks one per recipe: see `trainer_kind`). Names only: modules are imported when first asked for, so
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
    "preference": ("lora_ft.tasks.preference", None),  # None: the module's trainer_kind(raw) picks it by method
}
TASKS = tuple(_REGISTRY)
DEFAULT_TASK = TASKS[0]


def trainer_kind(name: str, raw: dict | None = None) -> str:
    """The trainer-arguments kind of a recipe (`raw`: its keys). A task registered with None chooses one per recipe
    through its module's `trainer_kind(raw)`, and may then also define `trainer_defaults(raw)` (trainer defaults that
    differ from lora_ft's) and `key_problem(key, raw)` (a message for a key another of its kinds takes)."""
    kind = _REGISTRY[name][1]
    return kind if kind is not None else get_task(name).trainer_kind(raw or {})


def trainer_defaults(name: str, raw: dict) -> dict:
    return get_task(name).trainer_defaults(raw) if _REGISTRY[name][1] is None else {}


def key_problem(name: str, key: str, raw: dict):
    return get_task(name).key_problem(key, raw) if _REGISTRY[name][1] is None else None


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
