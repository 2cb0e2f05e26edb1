"""Publishing to the Hugging Face Hub: stage what is uploaded, write its model card, upload that folder.

`stage()` copies an allowlist of a run dir (or a `lora-ft merge` folder) into a fresh folder and writes the
model card there; `upload()` sends that folder and nothing else. `lora-ft push --dry-run --output DIR` is the
same staging, so DIR shows byte for byte what a push publishes.

Never staged: pickles (*.bin, *.pt, *.pth, *.pkl, *.ckpt: they run code when loaded), subfolders
(checkpoint-N/ trainer states with optimizer and RNG pickles, runs/ TensorBoard logs), eval_predictions.jsonl
and eval_generations.jsonl (they quote the eval data), log_history.json, and the run's own README.md (peft's
placeholder card; ours replaces it). The token is read from HF_TOKEN or the stored `hf auth login` token and
only ever goes into the Authorization header of the upload requests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import yaml

from .builtin_models import BUILTINS, PREFIX
from .config import OUR_FIELDS, RECIPE_FILE, read_recipe_file
from .errors import LoraFtError
from .merge import REPORT_FILE
from .runs import METRICS_FILE
from .outputs import check_output, output_dir
from .security import portable, redact, redact_text
from .tasks import DEFAULT_TASK, get_task

CARD_FILE = "README.md"
CARD_MARK = "and published with `lora-ft push`"  # in every card stage() writes: how --output knows a staging of ours
DEFAULT_ENDPOINT = "https://huggingface.co"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
MODEL_CONFIG_FILES = ("config.json", "generation_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DATA_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".txt", ".tsv", ".arrow")

# Hub repo names: letters, digits, - _ . ; no leading/trailing - or ., no "--" or "..", at most 96 characters.
_HUB_ID = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,94}[A-Za-z0-9])?(/[A-Za-z0-9]([A-Za-z0-9._-]{0,94}[A-Za-z0-9])?)?$")

ADAPTER, MERGED, MODEL = "adapter", "merged", "model"


# ---------------------------------------------------------------- names


def hub_id_of(name: Optional[str]) -> Optional[str]:
    """The Hub id a model or dataset name refers to: builtin:NAME -> its Hub model; a local path -> None."""
    if not name:
        return None
    name = str(name)
    if name.startswith(PREFIX):
        m = BUILTINS.get(name[len(PREFIX):])
        return (m.hub_id or None) if m else None
    if os.path.isabs(name) or name.startswith((".", "~")) or Path(name).exists():
        return None
    if Path(name).suffix.lower() in DATA_SUFFIXES or "--" in name or ".." in name:
        return None
    return name if _HUB_ID.match(name) else None


def check_repo_id(repo_id: str) -> str:
    if "/" not in repo_id or not _HUB_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise LoraFtError(f"push: --repo-id '{repo_id}' is not a Hub repo id; expected user/name or org/name "
                          "(letters, digits, - _ .)")
    return repo_id


def get_token() -> Optional[str]:
    """HF_TOKEN, else the token stored by `hf auth login`. Never printed, logged or written by lora_ft."""
    from huggingface_hub import get_token as hf_get_token

    return hf_get_token()


def require_token(token: Optional[str]) -> str:
    if not token:
        raise LoraFtError("push: no Hugging Face token; run `hf auth login` (huggingface_hub's successor to "
                          "`huggingface-cli login`) or set HF_TOKEN to a token with write access")
    return token


# ---------------------------------------------------------------- what a folder holds


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


# ---------------------------------------------------------------- staging


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
    if base_model and not _HUB_ID.match(base_model):
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


# ---------------------------------------------------------------- model card


def model_card(*, kind: str, repo_id: str, revision: str, recipe: dict, base: Optional[str], metrics: dict,
               report: Optional[dict], files: list[str], chat: bool, metrics_from: Optional[str] = None,
               adapter_cfg: Optional[dict] = None) -> str:
    task = recipe.get("task") or DEFAULT_TASK
    quant = _quantization(recipe)
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "peft" if kind == ADAPTER else "transformers"
    meta["pipeline_tag"] = get_task(task).PIPELINE_TAG
    tags = (["lora"] if recipe.get("use_peft", True) else []) + ["lora_ft", task]
    if quant:
        tags.append("qlora")
    if kind == MERGED:
        tags.append("merged-lora")
    meta["tags"] = tags
    dataset = hub_id_of(recipe.get("dataset_name"))
    if dataset:
        meta["datasets"] = [dataset]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)

    what = {ADAPTER: "A LoRA adapter", MERGED: "A LoRA fine-tune merged into its base model (a plain model; no peft needed)",
            MODEL: "A fully fine-tuned model"}[kind]
    base_txt = _link(base) if base else f"`{recipe.get('model_name_or_path')}` (a local folder)"
    lines = [f"---\n{front}---", "", f"# {repo_id.split('/')[-1]}", "",
             f"{what} for {task} on top of {base_txt}, trained with lora_ft (`lora-ft train`) {CARD_MARK}.", ""]
    lines += [f"- **Task:** {task}", f"- **Base model:** {base_txt}"]
    if str(recipe.get("model_name_or_path", "")).startswith(PREFIX):
        lines.append(f"- **Trained from:** `{recipe['model_name_or_path']}` (lora_ft's offline copy of {_link(base) if base else 'the base'})")
    data = recipe.get("dataset_name")
    if data:
        lines.append(f"- **Dataset:** {_link(dataset, 'datasets/') if dataset else f'`{data}` (local data)'}"
                     + (f", config `{recipe['dataset_config']}`" if recipe.get("dataset_config") else ""))
    lines += get_task(task).card_lines(recipe)
    lines.append("")

    lines += _metrics_section(metrics, files, metrics_from)
    lines += _hyperparameter_section(recipe, quant, adapter_cfg)
    lines += _figures_section(metrics)
    lines += _provenance_section(kind, recipe, base, report, quant)
    lines += ["## Usage", "", "```python", usage_snippet(kind, task, repo_id, revision, recipe, chat), "```", ""]
    if kind == ADAPTER and quant:
        lines += [f"The adapter was trained on a {quant} base. The snippet loads the base in full precision, as "
                  "`lora-ft merge` does; for the training-time numbers load it quantized the same way "
                  "(`quantization_config=BitsAndBytesConfig(...)` with the values in `lora_ft_recipe.yaml`).", ""]
    lines += ["## Files", ""] + [f"- `{f}`{_describe(f)}" for f in files] + [""]
    lines += ["`lora_ft_recipe.yaml` is the resolved training recipe, every key (secrets redacted): "
              "`lora-ft train lora_ft_recipe.yaml` re-runs it where its dataset is available.", ""]
    return "\n".join(lines)


def _link(hub_id: Optional[str], prefix: str = "") -> str:
    return f"[{hub_id}](https://huggingface.co/{prefix}{hub_id})"


def _quantization(recipe: dict) -> Optional[str]:
    if recipe.get("load_in_4bit"):
        nested = ", nested quantization" if recipe.get("use_bnb_nested_quant") else ""
        return (f"4-bit {recipe.get('bnb_4bit_quant_type', 'nf4')} (bitsandbytes, compute dtype "
                f"{recipe.get('bnb_4bit_compute_dtype', 'bfloat16')}{nested})")
    if recipe.get("load_in_8bit"):
        return "8-bit (bitsandbytes LLM.int8)"
    return None


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) if v else "-"
    return str(v)


_NOT_QUALITY = ("runtime", "per_second", "samples", "epoch")


def _metrics_section(metrics: dict, files: list[str], metrics_from: Optional[str]) -> list[str]:
    rows = [(k, v) for k, v in metrics.items() if k.startswith("eval_") and not k.endswith("_before")
            and isinstance(v, (int, float)) and not isinstance(v, bool) and not any(s in k for s in _NOT_QUALITY)]
    out = ["## Evaluation", ""]
    if not rows:
        return out + ["No evaluation metrics were recorded for this run (trained with `eval_split: none`).", ""]
    if metrics_from:
        out += ["Measured on the adapter run this model was merged from; the merge was verified to reproduce its "
                "outputs (see Provenance).", ""]
    n = metrics.get("eval_samples")
    has_before = any(f"{k}_before" in metrics for k, _ in rows)
    out += ["| metric | value" + (" | before training |" if has_before else " |"),
            "|---|---" + ("|---|" if has_before else "|")]
    for k, v in rows:
        name = k.removeprefix("eval_")
        out.append(f"| {name} | {_fmt(v)}" + (f" | {_fmt(metrics.get(k + '_before'))} |" if has_before else " |"))
    out.append("")
    if n:
        out += [f"On {n} eval examples.", ""]
    per_class = metrics.get("eval_per_class")
    if isinstance(per_class, dict) and per_class:
        out += ["| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for lab, m in per_class.items():
            out.append(f"| {lab} | {_fmt(m.get('precision'))} | {_fmt(m.get('recall'))} | {_fmt(m.get('f1'))} | {m.get('support', '-')} |")
        out.append("")
    for png, title in (("confusion_matrix.png", "Confusion matrix"), ("loss_curve.png", "Loss curve")):
        if png in files:
            out += [f"![{title}]({png})", ""]
    return out


_HYPER = ("lora_r", "lora_alpha", "lora_dropout", "use_dora", "use_rslora", "init_lora_weights", "learning_rate",
          "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps", "per_device_train_batch_size",
          "gradient_accumulation_steps", "weight_decay", "max_length", "dtype", "bf16", "fp16", "seed")


def _hyperparameter_section(recipe: dict, quant: Optional[str], adapter_cfg: Optional[dict]) -> list[str]:
    out = ["## Training", "", "| hyperparameter | value |", "|---|---|"]
    lora = recipe.get("use_peft", True)
    if lora:
        cfg = adapter_cfg or {}
        targets = cfg.get("target_modules") or recipe.get("lora_target_modules") or "all linear layers but the head"
        saved = cfg.get("modules_to_save") or recipe.get("lora_modules_to_save")
        out.append(f"| LoRA target modules | {_fmt(sorted(set(targets)) if isinstance(targets, list) else targets)} |")
        out.append(f"| fully trained modules (modules_to_save) | {_fmt(sorted(set(saved)) if saved else None)} |")
    for k in _HYPER + get_task(recipe.get("task") or DEFAULT_TASK).CARD_HYPER:
        if k not in recipe or (not lora and k.startswith(("lora_", "use_dora", "use_rslora", "init_lora"))):
            continue
        if k in ("max_steps", "gradient_accumulation_steps") and (recipe[k] is None or recipe[k] <= (0 if k == "max_steps" else 1)):
            continue
        out.append(f"| {k} | {_fmt(recipe[k])} |")
    out.append(f"| quantization | {quant or 'none (full-precision base)'} |")
    return out + [""]


_FIGURES = (("train_runtime", "runtime (s)"), ("train_samples_per_second", "samples / s"),
            ("train_tokens_per_second", "tokens / s (non-pad)"), ("peak_memory_mb", "peak memory (MB)"),
            ("train_examples", "train examples"), ("global_step", "optimizer steps"), ("world_size", "processes"),
            ("train_loss", "final train loss"))


def _figures_section(metrics: dict) -> list[str]:
    rows = [(label, metrics[k]) for k, label in _FIGURES if metrics.get(k) is not None]
    if not rows:
        return []
    return ["### Training figures", "", "| figure | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows] + [""]


def _provenance_section(kind: str, recipe: dict, base: Optional[str], report: Optional[dict], quant: Optional[str]) -> list[str]:
    out = ["## Provenance", ""]
    src = str(recipe.get("model_name_or_path", ""))
    if src == f"{PREFIX}smollm2-135m-instruct":
        out.append(f"- Trained on lora_ft's offline SmolLM2: the Q4_1 GGUF of {_link(base)} dequantized to float32. "
                   "The adapter applies to the original weights, which differ from those by the Q4_1 rounding error.")
    elif src.startswith(PREFIX):
        out.append(f"- Trained on lora_ft's offline copy of {_link(base)} (`{src}`), the same weights.")
    if quant:
        out.append(f"- Quantization at training time: {quant}; LoRA weights and the classifier head in full precision.")
    if report:
        check = report.get("adapter_vs_merged", {})
        tol = report.get("tolerance", {})
        out.append(f"- Merged by `lora-ft merge` into a full-precision base, saved as {report.get('dtype')}, status "
                   f"**{report.get('status')}**: on {report.get('n_inputs')} held-out inputs the merged model matches the "
                   f"adapter model with max |logit difference| {_fmt(check.get('max_abs_logit_diff'))} (tolerance "
                   f"{_fmt(tol.get('max_abs_logit_diff'))}) and argmax agreement {_fmt(check.get('argmax_agreement'))}.")
        m = report.get("metric") or {}
        if m.get("name"):
            line = f"- {m['name']}: adapter {_fmt(m.get('adapter'))}, merged {_fmt(m.get('merged'))}"
            if m.get("trained_quantized") is not None:
                line += f", adapter on the quantized base it was trained on {_fmt(m.get('trained_quantized'))}"
            out.append(line + " (merge verification inputs).")
        if report.get("trained_quantized"):
            q = report.get("trained_quantized_vs_merged", {})
            out.append("- Trained on a quantized base, merged into full precision: the merged model no longer carries the "
                       f"quantization error the adapter learned around (max |logit difference| vs the trained QLoRA model "
                       f"{_fmt(q.get('max_abs_logit_diff'))}, argmax agreement {_fmt(q.get('argmax_agreement'))}).")
        if report.get("problems"):
            out.append("- Verification problems (merge was forced): " + "; ".join(map(str, report["problems"])))
        out.append("- Full numbers: `merge_report.json`.")
    if len(out) == 2:
        out.append(f"- {'Adapter' if kind == ADAPTER else 'Weights'} as saved by `lora-ft train`, safetensors only.")
    return out + [""]


def usage_snippet(kind: str, task: str, repo_id: str, revision: str, recipe: dict, chat: bool) -> str:
    """Python that loads the pushed repo and runs it: the imports here, the rest from the task."""
    t = get_task(task)
    rev = f', revision="{revision}"' if revision and revision != "main" else ""
    cls = t.PEFT_CLASS if kind == ADAPTER else t.AUTO_CLASS
    head = ["import torch", f"from peft import {cls}", "from transformers import AutoTokenizer"] if kind == ADAPTER else \
        ["import torch", f"from transformers import AutoTokenizer, {cls}"]
    head += ["", f'repo = "{repo_id}"', f"tokenizer = AutoTokenizer.from_pretrained(repo{rev})"]
    return t.usage_snippet(kind == ADAPTER, cls, head, rev, recipe, chat)


_DESCRIPTIONS = {
    "adapter_model.safetensors": "LoRA weights and fully trained modules (modules_to_save)",
    "adapter_config.json": "peft config; base_model_name_or_path names the Hub base",
    "model.safetensors": "model weights",
    "config.json": "model config",
    "generation_config.json": "generation defaults",
    "chat_template.jinja": "chat template used in training",
    RECIPE_FILE: "resolved training recipe (secrets redacted)",
    METRICS_FILE: "evaluation metrics and training figures",
    REPORT_FILE: "merge verification report",
    "loss_curve.png": "train / eval loss per step",
    "confusion_matrix.png": "eval confusion matrix",
    CARD_FILE: "this card",
}


def _describe(name: str) -> str:
    if name in _DESCRIPTIONS:
        return f": {_DESCRIPTIONS[name]}"
    if name in TOKENIZER_FILES:
        return ": tokenizer"
    return ""


# ---------------------------------------------------------------- upload


def resolve_endpoint(endpoint: Optional[str] = None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def upload(staged: str | os.PathLike, repo_id: str, *, token: Optional[str], private: bool = False,
           revision: str = "main", commit_message: Optional[str] = None, endpoint: Optional[str] = None) -> dict:
    """Create the repo if needed (and the branch, for a revision other than main) and upload `staged` as one commit."""
    from huggingface_hub import HfApi, constants

    url = resolve_endpoint(endpoint)
    require_token(token)
    if constants.is_offline_mode():
        raise LoraFtError("push: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or stage only with "
                          "--dry-run --output DIR")
    api = HfApi(endpoint=url, token=token)
    step = "create repo"
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            step = f"create branch {revision}"
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        step = "upload"
        info = api.upload_folder(repo_id=repo_id, folder_path=str(staged), repo_type="model", revision=revision,
                                 commit_message=commit_message or "lora-ft push")
    except Exception as e:
        msg = _failure(e, url, repo_id, step)
        if msg is None:
            raise
        raise LoraFtError(_scrub(msg, token)) from None
    tree = f"{url}/{repo_id}" + (f"/tree/{revision}" if revision and revision != "main" else "")
    return {"repo_id": repo_id, "revision": revision, "url": tree, "commit_url": getattr(info, "commit_url", None),
            "commit": getattr(info, "oid", None)}


def _failure(e: BaseException, url: str, repo_id: str, step: str) -> Optional[str]:
    """One line for a failed Hub call, looking through wrappers (huggingface_hub wraps LFS errors in RuntimeError);
    None for a failure that is not the Hub's or the network's (a bug: let its traceback show)."""
    from huggingface_hub.errors import HfHubHTTPError

    seen = e
    while seen is not None:
        if isinstance(seen, HfHubHTTPError):
            return _http_message(seen, url, repo_id, step)
        root = type(seen).__module__.split(".")[0]
        if isinstance(seen, (ConnectionError, TimeoutError)) or root in ("httpx", "httpx2", "httpcore", "hf_xet"):
            return (f"push: cannot reach {url} during {step} ({type(seen).__name__}: {_first_line(seen)}); "
                    "check the network or HF_ENDPOINT, or stage only with --dry-run --output DIR")
        if isinstance(seen, ValueError):  # the Hub rejected the card metadata, or answered something malformed
            return f"push: {url} refused the {step} ({_one_line(seen)})"
        seen = seen.__cause__
    return None


def _http_message(e, url: str, repo_id: str, step: str) -> str:
    resp = getattr(e, "response", None)
    status = getattr(resp, "status_code", None)
    server = getattr(e, "server_message", None) or ""
    why = f" ({_first_line(server)})" if server else ""
    if status == 401:
        return (f"push: {url} rejected the token during {step} (401){why}; log in again with `hf auth login` or set "
                "HF_TOKEN to a valid token")
    if status == 403:
        return f"push: no write access to {repo_id} on {url} (403){why}; use a token with write scope for that namespace"
    if status == 404:
        return f"push: {url} has no {repo_id} to {step} into (404){why}; check --repo-id and --revision"
    return f"push: {url} answered {status} during {step}{why or ' (' + _first_line(e) + ')'}"


def _first_line(e) -> str:
    text = str(e).strip()
    return redact_text(text.splitlines()[0] if text else type(e).__name__)


def _one_line(e) -> str:
    """All of a multi-line message (the Hub lists metadata errors one per line) on one line."""
    parts = [ln.strip(" -") for ln in str(e).splitlines() if ln.strip(" -")]
    return redact_text("; ".join(parts)[:500] or type(e).__name__)


def _scrub(msg: str, token: Optional[str]) -> str:
    msg = redact_text(msg)
    return msg.replace(token, "***") if token else msg
