"""The model card: what was trained on what, the measured metrics, the hyperparameters, provenance, a usage snippet."""

from __future__ import annotations

from typing import Any, Optional

import yaml

from ..builtin_models import PREFIX
from ..config import RECIPE_FILE
from ..merge import REPORT_FILE
from ..runs import METRICS_FILE
from ..tasks import DEFAULT_TASK, get_task
from .names import ADAPTER, CARD_FILE, CARD_MARK, MERGED, MODEL, TOKENIZER_FILES, hub_id_of

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
