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
from pathlib import Path

from .config import RECIPE_FILE, read_recipe_file
from .errors import RunDirError

METRICS_FILE = "metrics.json"
STAGE = ".saving"  # final files are written here, then moved into the run dir
# Keys that make two recipes "the same run" for the purpose of reusing an output_dir.
IDENTITY_KEYS = ("task", "model_name_or_path", "dataset_name")


def check_output_dir(run_dir: Path, recipe) -> None:
    """Refuse to write into a folder that holds something else; re-running the same recipe is fine."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunDirError(f"output_dir: {run_dir} is a file; choose a folder path")
    entries = [p for p in run_dir.iterdir() if not p.name.startswith(".")]
    if not entries:
        return
    saved = run_dir / RECIPE_FILE
    if not saved.is_file():
        only_ours = all(p.name.startswith(("checkpoint-", "runs", "logs")) for p in entries)
        if only_ours:
            return  # an interrupted run of ours: checkpoints only
        raise RunDirError(f"output_dir: {run_dir} is not empty and is not a lora_ft run; choose a new --output_dir")
    old = read_recipe_file(saved)
    new = recipe.to_dict()
    diff = [k for k in IDENTITY_KEYS if str(old.get(k)) != str(new.get(k))]
    if diff:
        what = ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in diff)
        raise RunDirError(f"output_dir: {run_dir} holds a different run ({what}); choose a new --output_dir or delete it")


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
        raise RunDirError(f"{run_dir}: no {RECIPE_FILE}; pass the output_dir of a finished `lora-ft train` run")
    if not ((p / "adapter_config.json").is_file() or (p / "config.json").is_file()):
        raise RunDirError(f"{run_dir}: no adapter or model weights; the run did not finish (resume it with --resume_from_checkpoint true)")
    return p
