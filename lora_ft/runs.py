"""The run directory: it is the adapter folder itself, plus the resolved recipe, metrics and plots.

Layout written by `lora-ft train`:
    adapter_config.json, adapter_model.safetensors   (or a full model for use_peft: false)
    tokenizer files, chat_template.jinja              (what serving must use)
    lora_ft_recipe.yaml                               (resolved recipe; labels in id order)
    metrics.json, loss_curve.png, confusion_matrix.{json,png}, eval_predictions.jsonl
    checkpoint-N/                                     (resumable trainer state)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .config import RECIPE_FILE, read_recipe_file
from .errors import RunDirError

METRICS_FILE = "metrics.json"
STAGE = ".saving"  # final files are written here, then moved into the run dir
PREVIOUS = ".previous"  # the previous run's final files, moved aside while the new ones move in
LIVE = ".live"  # final files a run appends to while it trains (eval generations): staged with the rest at the end
# Trainer state and logs, not final files: a resumed run needs its checkpoints, and logs only accumulate.
NOT_FINAL = ("checkpoint-", "runs", "logs")
# Recipe keys that do not change what a run produces: a re-run that differs only in these is the same run.
NON_RUN_KEYS = frozenset({
    "output_dir", "overwrite", "resume_from_checkpoint", "logging_dir", "logging_steps", "logging_strategy",
    "logging_first_step", "logging_nan_inf_filter", "report_to", "disable_tqdm", "run_name", "save_strategy",
    "save_steps", "save_total_limit", "save_only_model", "dataloader_num_workers", "push_to_hub", "hub_model_id",
    "hub_token", "hub_strategy", "hub_private_repo", "include_num_input_tokens_seen",
})

# Keys a recipe may leave unresolved (value here) that training fills in from the data and saves resolved.
DERIVED = {"labels": None, "dataset_format": "auto", "use_chat_template": None}


def check_output_dir(run_dir: Path, recipe, overwrite: bool = False) -> None:
    """Refuse to write into a folder that holds something else or another recipe's run; the same recipe re-run
    (to resume or replace it) is fine, and so is any recipe with --overwrite."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunDirError(f"output_dir: {run_dir} is a file; choose a folder path")
    entries = [p for p in run_dir.iterdir() if not p.name.startswith(".")]
    saved = _saved_recipe(run_dir)
    if not entries and saved is None:
        return
    if saved is None:
        if all(p.name.startswith(NOT_FINAL) for p in entries):
            return  # an interrupted run of ours: checkpoints only
        raise RunDirError(f"output_dir: {run_dir} is not empty and is not a lora_ft run; choose a new --output_dir")
    if overwrite:
        return
    diff = recipe_diff(read_recipe_file(saved), recipe)
    if diff:
        what = ", ".join(f"{k}: {old} -> {new}" for k, old, new in diff)
        raise RunDirError(f"output_dir: {run_dir} holds a different run ({what}); choose a new --output_dir, "
                          "or pass --overwrite to replace it")


def _saved_recipe(run_dir: Path):
    """The recipe of the run in `run_dir`, also when its final move was cut short (then it sits in a side folder)."""
    for p in (run_dir / RECIPE_FILE, run_dir / STAGE / RECIPE_FILE, run_dir / PREVIOUS / RECIPE_FILE):
        if p.is_file():
            return p
    return None


def recipe_diff(saved: dict, recipe) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every output-affecting key the two recipes set differently."""
    import yaml

    from .security import redact

    # Compared as save_recipe would write the new one: YAML types, secrets redacted.
    new = yaml.safe_load(yaml.safe_dump(redact(recipe.to_dict())))
    saved = _as_resolved(saved)
    out = []
    for k in sorted(set(saved) | set(new)):
        if k in NON_RUN_KEYS:
            continue
        if k in DERIVED and new.get(k) == DERIVED[k]:
            continue  # left to training to fill in from the data: the saved value is what this recipe also gets
        if saved.get(k) != new.get(k):
            out.append((k, saved.get(k), new.get(k)))
    return out


def _as_resolved(saved: dict) -> dict:
    """The saved recipe with the keys a newer lora_ft added filled in with their defaults, as save_recipe would write
    it today: a run saved before a key existed is not "different" for lacking it."""
    import yaml

    from .config import resolve
    from .errors import RecipeError
    from .security import redact

    try:
        return yaml.safe_load(yaml.safe_dump(redact(resolve(dict(saved)).to_dict())))
    except RecipeError:  # a recipe this version no longer accepts: compare what it says
        return saved


def live_file(output_dir, name: str) -> Path:
    """Where a file the run appends to during training goes: not among the previous run's final files."""
    path = Path(output_dir) / LIVE / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def clear_live_files(run_dir: Path) -> None:
    """A run that starts over (no resume) drops the rows an unfinished earlier run appended."""
    shutil.rmtree(run_dir / LIVE, ignore_errors=True)


def stage_live_files(run_dir: Path, stage: Path) -> None:
    live = run_dir / LIVE
    if live.is_dir():
        for f in live.iterdir():
            os.replace(f, stage / f.name)
        live.rmdir()


def replace_final_files(run_dir: Path, stage: Path) -> None:
    """Move the staged final files into `run_dir` as a set: the previous run's final files (an adapter the new
    run did not write, old eval rows) move aside first, and are deleted only once the new set is in.

    The recipe goes aside first and comes in next to last (metrics.json last): a folder without it loads in no
    command, so a crash at any point leaves either the old run, the new one, or nothing that loads."""
    old = run_dir / PREVIOUS
    shutil.rmtree(old, ignore_errors=True)
    old.mkdir()
    current = [p for p in run_dir.iterdir() if not p.name.startswith(".") and not p.name.startswith(NOT_FINAL)]
    for f in sorted(current, key=lambda f: f.name != RECIPE_FILE):
        os.replace(f, old / f.name)
    for f in sorted(stage.iterdir(), key=lambda f: (f.name in (RECIPE_FILE, METRICS_FILE), f.name == METRICS_FILE)):
        os.replace(f, run_dir / f.name)
    stage.rmdir()
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj) -> None:
    """Write aside then rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable), encoding="utf-8")
    os.replace(tmp, path)


def _jsonable(o):
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def read_metrics(run_dir: Path) -> dict:
    p = Path(run_dir) / METRICS_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def require_run_dir(run_dir: str | os.PathLike) -> Path:
    p = Path(run_dir)
    if not p.is_dir():
        raise RunDirError(f"{run_dir}: no such run dir; pass the output_dir of a `lora-ft train` run")
    if not (p / RECIPE_FILE).is_file():
        if (p / STAGE).is_dir() or (p / PREVIOUS).is_dir():
            raise RunDirError(f"{run_dir}: its final save was cut short (no {RECIPE_FILE}); rerun the same `lora-ft train` "
                              "command with --resume_from_checkpoint true")
        raise RunDirError(f"{run_dir}: no {RECIPE_FILE}; pass the output_dir of a finished `lora-ft train` run")
    if not ((p / "adapter_config.json").is_file() or (p / "config.json").is_file()):
        raise RunDirError(f"{run_dir}: no adapter or model weights; the run did not finish (resume it with --resume_from_checkpoint true)")
    return p
