"""The task protocol: every registered task implements all of it, the registry is the only list of tasks, and no
module outside lora_ft/tasks/ names a task."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO
from lora_ft import config
from lora_ft.tasks import TASKS, get_task
from lora_ft.tasks.base import PROTOCOL, missing_members

TASK_LITERAL = re.compile(r'"(sequence-classification|causal-lm|seq2seq|token-classification|preference)"')


@pytest.mark.parametrize("name", TASKS)
def test_every_task_implements_the_whole_protocol(name):
    module = get_task(name)
    assert missing_members(module) == []
    assert module.NAME == name
    assert callable(module.prepare_data) and callable(module.verify_logits) and callable(module.usage_snippet)
    assert (module.predict is None) == module.GENERATES  # a task either labels texts or generates


def test_config_tasks_come_from_the_registry():
    assert config.TASKS == TASKS and "token-classification" in TASKS
    assert config.OUR_FIELDS["task"].default == TASKS[0]


def test_the_protocol_lists_what_the_registry_docstring_promises():
    import lora_ft.tasks as registry

    for word in ("data preparation", "pipeline tag", "search space", "serving routes", "ONNX", "merge verification"):
        assert word in registry.__doc__
    assert {"verify_logits", "ONNX_GRAPH", "PIPELINE_TAG", "SERVE_ROUTES", "MEMORY_HEAD", "SELECT_METRIC"} <= set(PROTOCOL)


def test_no_module_outside_tasks_names_a_task():
    """Task differences live in the task modules: a literal elsewhere is a branch that the next task falls through."""
    hits = []
    for path in sorted((REPO / "lora_ft").rglob("*.py")):
        if "tasks" in path.relative_to(REPO / "lora_ft").parts:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            hits += [f"{path.relative_to(REPO)}:{n}" for _ in TASK_LITERAL.finditer(line)]
    assert len(hits) <= 5, hits


def test_registry_imports_no_ml_stack():
    """config.py reads TASKS at import and recipe checks call into task modules: both must stay light."""
    code = ("import sys; from lora_ft.tasks import TASKS, get_task; [get_task(t).recipe_problems for t in TASKS]; "
            "print([m for m in ('torch', 'transformers', 'datasets', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_unknown_task_is_one_clear_error():
    from lora_ft.errors import LoraFtError

    with pytest.raises(LoraFtError, match="task: 'ner' is not one of"):
        get_task("ner")
