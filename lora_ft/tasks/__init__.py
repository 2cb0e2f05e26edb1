"""Task registry: everything that differs between task families is reached through here.

Adding a task means adding a module with the same names (AUTO_CLASS, PEFT_TASK_TYPE, prepare_data,
model_kwargs, setup_model, build_trainer, final_eval) and one line below.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "sequence-classification": "lora_ft.tasks.classification",
    "causal-lm": "lora_ft.tasks.causal_lm",
    "seq2seq": "lora_ft.tasks.seq2seq",
}


def get_task(name: str):
    if name not in _MODULES:
        from ..errors import LoraFtError

        raise LoraFtError(f"task: '{name}' is not implemented yet; available: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name])


def auto_class(task_module):
    import transformers

    return getattr(transformers, task_module.AUTO_CLASS)
