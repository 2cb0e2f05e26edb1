"""Shipped recipes parse and validate, the commands in their headers are valid, and scripts/sft.py == lora-ft train."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from conftest import REPO
from lora_ft.builtin_models import BUILTINS, PREFIX
from lora_ft.config import TASKS, load_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def header_commands(path: Path) -> list[list[str]]:
    """Argument lists after `RECIPE` in the header's `lora-ft train` / `scripts/sft.py` lines (continuations joined)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = "\n".join(lines).replace("\\\n", " ")
    rel = f"recipes/{path.name}"
    cmds = []
    for line in text.splitlines():
        before, found, after = line.partition(rel)
        if found and ("lora-ft train" in before or "sft.py" in before):
            try:
                words = shlex.split(after)
            except ValueError:  # prose after the command, e.g. an apostrophe
                words = after.split()
            cmds.append(_leading_overrides(words))
    return cmds


def _leading_overrides(words: list[str]) -> list[str]:
    """`--key value` pairs (or bare `--flag`s) up to the first word that is neither, e.g. "(or: make quickstart)"."""
    out, i = [], 0
    while i < len(words) and words[i].startswith("--"):
        out.append(words[i])
        if i + 1 < len(words) and not words[i + 1].startswith("--"):
            out.append(words[i + 1])
            i += 1
        i += 1
    return out


def test_recipes_are_shipped():
    assert len(RECIPES) >= 3, RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_parses_and_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)  # relative paths in recipes are relative to the repo root
    r = load_recipe(path)
    assert r.args.task in TASKS
    assert r.output_dir == f"runs/{path.stem}"  # each recipe writes where its name says
    model = r.args.model_name_or_path
    if model.startswith(PREFIX):
        assert model[len(PREFIX):] in BUILTINS
    data = r.args.dataset_name
    if not data.startswith((".", "/", "~")) and (REPO / data.split("/")[0]).is_dir():  # a path inside the repo
        assert (REPO / data).exists(), f"{path.name}: dataset_name {data} is missing from the repo"


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_header_gives_the_command(path, monkeypatch):
    assert path.read_text(encoding="utf-8").startswith("#"), f"{path.name}: start with a comment giving the command"
    cmds = header_commands(path)
    assert cmds, f"{path.name}: the header names no `lora-ft train recipes/{path.name}` command"
    monkeypatch.chdir(REPO)
    for extra in cmds:
        load_recipe(path, extra)  # the documented overrides are valid keys and values


# ---------------------------------------------------------------- scripts/sft.py


def test_sft_script_equals_lora_ft_train(gpt2_run, tmp_path, monkeypatch, capsys):
    """Same recipe and overrides through scripts/sft.py, run as `python scripts/sft.py` runs it (as __main__; in this
    process, which saves a process start of ~12 s on a slow CPU): same steps, same losses, same adapter."""
    import runpy

    from safetensors.torch import load_file

    out = tmp_path / "sft_run"
    script = REPO / "scripts" / "sft.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(gpt2_run.recipe), *map(str, gpt2_run.overrides), "--output_dir", str(out)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0, capsys.readouterr().err[-3000:]
    assert "Traceback" not in capsys.readouterr().err

    def losses(d):
        return [h["loss"] for h in json.loads((d / "log_history.json").read_text()) if "loss" in h]

    assert losses(out) == pytest.approx(losses(gpt2_run.run_dir), rel=1e-6)
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (out, gpt2_run.run_dir))
    for key in ("global_step", "eval_accuracy", "eval_macro_f1", "train_examples"):
        assert ours[key] == pytest.approx(theirs[key]), key
    a, b = load_file(out / "adapter_model.safetensors"), load_file(gpt2_run.run_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-6, k
    assert (out / "lora_ft_recipe.yaml").read_text().split("\n", 1)[1] == \
        (gpt2_run.run_dir / "lora_ft_recipe.yaml").read_text().split("\n", 1)[1].replace(str(gpt2_run.run_dir), str(out))


# ---------------------------------------------------------------- the real quickstart (make bench)


@pytest.mark.slow
def test_quickstart_recipe_learns(tmp_path):
    """The README's first command on the builtin MiniLM: accuracy after training beats the random head before."""
    from conftest import run_cli

    out = tmp_path / "quickstart"
    proc = run_cli("train", REPO / "recipes" / "quickstart.yaml", "--output_dir", out, "--report_to", "none",
                   "--disable_tqdm", "true", cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_accuracy"] > m["eval_accuracy_before"] + 0.2
    assert m["eval_accuracy"] >= 0.8
