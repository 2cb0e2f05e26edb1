"""Staging: the allowlist of a run dir or merge folder copied into a fresh folder, with its model card."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import OUR_FIELDS, RECIPE_FILE, read_recipe_file
from ..errors import LoraFtError
from ..merge import REPORT_FILE
from ..runs import METRICS_FILE
from ..outputs import check_output, output_dir
from ..security import portable, redact
from .card import model_card
from .names import (ADAPTER, CARD_FILE, CARD_MARK, HUB_ID_PATTERN, MERGED, MODEL, MODEL_CONFIG_FILES, PICKLE_SUFFIXES,
    TEMPLATE_FILES, TOKENIZER_FILES, check_repo_id, hub_id_of)

def detect(source: Path) -> str:
    """adapter (a `lora-ft train` run), merged (a `lora-ft merge` folder) or model (a use_peft: false run)."""
    if not source.is_dir():
        raise LoraFtError(f"push: {source}: no such folder; pass a `lora-ft train` run dir or a `lora-ft merge` output")
    if not (source / RECIPE_FILE).is_file():
        raise LoraFtError(f"push: {source}: no {RECIPE_FILE}; pass a `lora-ft train` run dir or a `lora-ft merge` output")
    if (source / "adapter_config.json").is_file():
        kind, weights = ADAPTER, sorted(source.glob("adapter_model*.safetensors"))
    elif (source / "config.json").is_file():
        kind, weights = (MERGED if (source / REPORT_FILE).is_file() else MODEL), sorted(source.glob("model*.safetensors"))
    else:
        raise LoraFtError(f"push: {source}: no adapter_config.json or config.json; the run did not finish")
    if not weights:
        stems = ("adapter_model",) if kind == ADAPTER else ("pytorch_model", "model")
        pickled = sorted(p.name for p in source.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES
                         and p.name.startswith(stems))
        if pickled:
            raise LoraFtError(f"push: {source} holds only pickled weights ({', '.join(pickled)}), which run code when "
                              "loaded; lora_ft publishes safetensors only: re-save with save_pretrained(safe_serialization=True)")
        raise LoraFtError(f"push: {source}: no safetensors weights; the run did not finish")
    return kind

def _selected(source: Path, kind: str) -> tuple[list[str], list[str]]:
    """(top-level files to copy as they are, skipped entries with the reason) for a source folder."""
    keep, skipped = [], []
    for p in sorted(source.iterdir(), key=lambda q: q.name):
        n = p.name
        if n.startswith("."):
            continue
        if p.is_dir():
            skipped.append(f"{n}/ (folder: checkpoints and logs are never uploaded)")
        elif p.suffix in PICKLE_SUFFIXES:
            skipped.append(f"{n} (pickle: never uploaded)")
        elif n.endswith(".safetensors") or n.endswith(".safetensors.index.json"):
            keep.append(n)
        elif n in TOKENIZER_FILES or n in TEMPLATE_FILES or n.endswith(".png"):
            keep.append(n)
        elif n in MODEL_CONFIG_FILES and kind != ADAPTER:
            keep.append(n)
        elif n == "generation_config.json":
            keep.append(n)
        elif n in ("adapter_config.json", RECIPE_FILE, METRICS_FILE, REPORT_FILE):
            pass  # rewritten below
        elif n == CARD_FILE:
            skipped.append(f"{n} (replaced by the generated model card)")
        else:
            skipped.append(f"{n} (not part of a published model)")
    return keep, skipped

def _recipe(source: Path) -> dict[str, Any]:
    """The saved recipe with lora_ft's defaults filled in for keys it leaves out."""
    raw = read_recipe_file(source / RECIPE_FILE)
    full = {k: f.default for k, f in OUR_FIELDS.items() if not callable(getattr(f, "default_factory", None))}
    full.update(raw)
    return full

def _source_run(source: Path, report: dict) -> Optional[Path]:
    """The adapter run a merged folder came from, when it is still there and holds the very recipe merge copied."""
    run = report.get("run_dir")
    if not run:
        return None
    p = Path(run)
    try:
        same = (p / RECIPE_FILE).read_bytes() == (source / RECIPE_FILE).read_bytes()
    except OSError:
        return None
    return p if same and (p / METRICS_FILE).is_file() else None

def stage(source: str | os.PathLike, output: str | os.PathLike, repo_id: str, *, revision: str = "main",
          base_model: Optional[str] = None, token: Optional[str] = None, link: bool = False, overwrite: bool = False) -> dict:
    """Write the folder a push uploads into `output` (atomically) and return its manifest.

    base_model: the Hub id of the base, for runs trained from a local folder (builtin:NAME and Hub ids resolve
    themselves). token: only to check that it appears in no staged file. link: hard-link weights instead of
    copying them, for a throwaway staging folder (a kept one must not change when the run dir is rewritten).
    """
    src = Path(source)
    kind = detect(src)
    check_repo_id(repo_id)
    out = Path(output)
    check_output(out, _is_staged, sources=[src], overwrite=overwrite, what="push: --output")
    recipe = _recipe(src)
    warnings: list[str] = []
    base = base_model or hub_id_of(recipe.get("model_name_or_path"))
    if base_model and not HUB_ID_PATTERN.match(base_model):
        warnings.append(f"--base-model {base_model} is not a Hub id; the Hub will not link the base, and others "
                        "cannot load the adapter from it")
    if base is None:
        msg = (f"push: the base model '{recipe.get('model_name_or_path')}' is a local folder, so the card cannot name "
               "it on the Hub; pass --base-model HUB_ID (the Hub model those weights are)")
        if kind == ADAPTER:  # an adapter whose base nobody else can load is unusable
            raise LoraFtError(msg + "; an adapter is unusable without it")
        warnings.append(msg.removeprefix("push: ") + "; the card names no base_model")

    keep, skipped = _selected(src, kind)
    report = json.loads((src / REPORT_FILE).read_text(encoding="utf-8")) if kind == MERGED else None
    metrics_dir = src if (src / METRICS_FILE).is_file() else None
    if report is not None and metrics_dir is None:
        metrics_dir = _source_run(src, report)

    recipe = portable(recipe)  # the base's Hub id is settled above; from here on no local path is written
    with output_dir(out, _is_staged, sources=[src], overwrite=overwrite, what="push: --output") as tmp:
        copy = _link_or_copy if link else shutil.copyfile
        for name in keep:
            copy(src / name, tmp / name)
        cfg = None
        if kind == ADAPTER:
            cfg = json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
            cfg["base_model_name_or_path"] = base  # the local path it was trained from means nothing elsewhere
            _write_json(tmp / "adapter_config.json", cfg)
        body = yaml.safe_dump(portable(redact(read_recipe_file(src / RECIPE_FILE))), sort_keys=False, allow_unicode=True)
        (tmp / RECIPE_FILE).write_text(f"# resolved by lora_ft; secrets redacted by `lora-ft push`\n{body}", encoding="utf-8")
        metrics = {}
        if metrics_dir is not None:
            metrics = json.loads((metrics_dir / METRICS_FILE).read_text(encoding="utf-8"))
            metrics = portable(redact(metrics))
            _write_json(tmp / METRICS_FILE, metrics)
            if metrics_dir != src:  # a merged folder: the plots of the run it came from
                for png in sorted(metrics_dir.glob("*.png")):
                    copy(png, tmp / png.name)
        if report is not None:
            report = portable(redact(report))
            _write_json(tmp / REPORT_FILE, report)
        files = sorted(p.name for p in tmp.iterdir()) + [CARD_FILE]
        card = model_card(kind=kind, repo_id=repo_id, revision=revision, recipe=recipe, base=base, metrics=metrics,
                          report=report, files=files, chat=_uses_chat(recipe, tmp),
                          metrics_from=None if metrics_dir in (None, src) else str(metrics_dir), adapter_cfg=cfg)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        if token:
            _check_no_token(tmp, token)
    return {"source": str(src), "kind": kind, "repo_id": repo_id, "revision": revision, "base_model": base,
            "staged": str(out), "files": sorted(p.name for p in out.iterdir()), "skipped": skipped, "warnings": warnings}

def _is_staged(out: Path) -> bool:
    """A folder `stage` wrote: lora_ft's model card and recipe, no subfolders (a run dir has peft's card instead)."""
    card = out / CARD_FILE
    try:
        ours = CARD_MARK in card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return ours and (out / RECIPE_FILE).is_file() and not any(p.is_dir() for p in out.iterdir())

def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the filesystem allows (a merged model is gigabytes), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)

def _check_no_token(folder: Path, token: str) -> None:
    needle = token.encode()
    for p in folder.iterdir():
        if p.suffix == ".safetensors":  # tensors, plus a JSON header that may hold metadata strings
            with open(p, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                text = fh.read(min(size, 100_000_000))
        else:
            text = p.read_bytes()
        if needle in text:
            raise LoraFtError(f"push: {p.name} contains your Hugging Face token; nothing staged or uploaded. "
                              "Remove it from the run dir and push again")

def _uses_chat(recipe: dict, staged: Path) -> bool:
    if recipe.get("use_chat_template") is not None:
        return bool(recipe["use_chat_template"])
    if recipe.get("chat_template") or (staged / "chat_template.jinja").is_file() or (staged / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((staged / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False
