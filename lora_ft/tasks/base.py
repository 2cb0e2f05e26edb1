"""The task protocol: every name a task module defines, and the helpers several tasks share.

A task is a module (`lora_ft/tasks/<name>.py`) whose module-level names are the members of `TaskModule` below.
The rest of lora_ft reaches task behaviour only through them (`tasks.get_task(recipe.args.task).NAME`), so no
module outside `lora_ft/tasks/` names a task. `tests/test_tasks.py` checks that every registered module defines
every member. Task modules stay light at import (no torch, transformers or datasets at module level): recipe
checks call into them while a recipe is parsed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Protocol

from ..errors import LoraFtError


class TaskModule(Protocol):
    # --- model and training
    AUTO_CLASS: str  # transformers auto class, e.g. "AutoModelForTokenClassification"
    PEFT_CLASS: str  # peft auto class for a plain reload, e.g. "AutoPeftModelForTokenClassification"
    PEFT_TASK_TYPE: str  # peft TaskType member name
    ENCODER_DECODER: bool  # the model has an encoder and a decoder (doctor's decoder checks skip it)
    HAS_HEAD: bool  # a freshly initialised head that must be trained and saved (doctor's head check, pad token check)
    recipe_problems: Callable  # (args, trainer: dict) -> list[str]: task-specific recipe checks, before torch loads
    training_kwargs: Callable  # (args) -> dict: extra arguments for the trainer-arguments class (defaults only)
    prepare_data: Callable  # (recipe, tokenizer) -> PreparedData with .train, .eval, .notes, .train_tokens
    data_checks: Callable  # (tokenizer, data, recipe) -> list[doctor.Check] on the prepared data (train and doctor)
    model_kwargs: Callable  # (data) -> kwargs for from_pretrained at training (num_labels, id2label ...)
    reload_kwargs: Callable  # (args) -> the same kwargs from a saved recipe, for every later load
    setup_model: Callable  # (model, tokenizer) -> None: pad_token_id, embedding size
    build_trainer: Callable  # (model, tokenizer, training_args, data, callbacks) -> Trainer (collator, metrics inside)
    final_eval: Callable  # (trainer, data, run_dir) -> metrics dict; writes the task's eval files into run_dir
    evaluate_run: Callable  # (model, tok, recipe, split) -> metrics dict (`lora-ft eval`)
    SELECT_METRIC: str  # the metric search (and load_best_model_at_end users) select on
    # --- inference: one encoding for eval, predict, merge verification, serve and export checks
    encode: Optional[Callable]  # (tok, texts, args, return_tensors) -> model inputs; None: prompts are rendered to generate
    predict: Optional[Callable]  # (model, tok, texts, recipe, batch_size) -> one JSON-able row per text; None: generates
    GENERATES: bool  # `lora-ft generate` and /v1/generate apply
    # --- merge
    verify_inputs: Callable  # (run_dir, n) -> (inputs, references) from the run's eval outputs
    verify_logits: Callable  # (model, tok, inputs, args) -> list of logits tensors, as predict computes them
    verify_metric: Callable  # (logits, references, args) -> (name, value) or None
    COMBINABLE: bool  # several adapters may be combined (merge --combination): no per-run head
    # --- export
    ONNX_GRAPH: Optional[str]  # export_onnx graph kind ("logits", "token-logits", "encoder-decoder"), None: refused
    export_check: Callable  # (model, reloaded, tok, texts, args) -> dict: the bnb4 export's agreement check
    # --- hub
    PIPELINE_TAG: str
    CARD_HYPER: tuple  # recipe keys the model card lists besides the common ones
    card_lines: Callable  # (recipe dict) -> extra "- **...**" lines of the card header
    usage_snippet: Callable  # (kind, cls, head lines, rev, recipe, chat) -> Python source that runs
    # --- search, compress, serve, memory
    SEARCH_SPACE: str
    COMPRESS_METRIC: str
    SERVE_ROUTES: tuple  # the HTTP routes that serve this task
    ARCHITECTURES: tuple  # endings of config.json `architectures` names: a plain HF folder is served as this task
    MEMORY_HEAD: str  # memory model: "none" (small head), "chunked" (causal LM), "full" (full-vocabulary logits),
    #   "paired-reference" (two sequences per example and a no-grad reference pass)


PROTOCOL = tuple(TaskModule.__annotations__)


def missing_members(module) -> list[str]:
    return [name for name in PROTOCOL if not hasattr(module, name)]


# ---------------------------------------------------------------- shared pieces

# Text-cleaning and row-filtering keys apply to classification-style text inputs only.
TEXT_CLASSIFICATION_KEYS = ("clean_lowercase", "clean_urls", "clean_mentions", "clean_whitespace", "drop_duplicates",
                            "drop_eval_leaks")


# Token-classification keys: set away from their defaults in another task's recipe, they would do nothing.
TOKEN_KEYS = ("tokens_column", "tags_column", "tag_scheme", "label_all_tokens")
# Preference keys lora_ft owns (trl 1.16's configs dropped them or name them per trainer): the same rule.
PREFERENCE_KEYS = ("preference_method", "max_prompt_length", "max_completion_length", "rpo_alpha")
_OWNER = {**{k: "token-classification" for k in TOKEN_KEYS}, **{k: "preference" for k in PREFERENCE_KEYS}}


def only_for(task_name: str, args, keys=TEXT_CLASSIFICATION_KEYS, also=()) -> list[str]:
    """Keys of `keys` (plus augment, head_init: label_words) set in a recipe whose task does not use them; `also`:
    keys that count as set when they differ from their default (the preference keys always count)."""
    import dataclasses

    if keys:
        set_keys = [k for k in keys if getattr(args, k)] + (["augment"] if args.augment else [])
        p = [f"{', '.join(set_keys)}: apply to task: {task_name} only"] if set_keys else []
        if args.head_init == "label_words":
            p.append(f"head_init: label_words applies to task: {task_name} only")
    else:
        p = []
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    also = tuple(also) + PREFERENCE_KEYS  # every task refuses them but their own
    changed = [k for k in dict.fromkeys(also) if getattr(args, k) != defaults[k] and _OWNER[k] != args.task]
    for owner in dict.fromkeys(_OWNER[k] for k in changed):
        p.append(f"{', '.join(k for k in changed if _OWNER[k] == owner)}: apply to task: {owner} only")
    return p


def no_reload_kwargs(args) -> dict:
    return {}


def no_data_checks(tok, data, recipe) -> list:
    return []


def no_card_lines(recipe: dict) -> list[str]:
    return []


def refuse(what: str, task: str, instead: str):
    """A clear refusal for a command that does not apply to a task."""
    raise LoraFtError(f"{what}: does not apply to task {task}; {instead}")


def eval_rows(run_dir: Path, name: str, key: str, ref: Optional[str], n: int) -> tuple[list, list]:
    """(unique inputs, references) from a run's eval JSONL, for merge verification."""
    import json

    path = run_dir / name
    if not path.is_file():
        raise LoraFtError(f"merge: {run_dir} has no {name} to verify with; pass --inputs FILE (one text per line)")
    seen, inputs, refs = set(), [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        k = json.dumps(r[key]) if not isinstance(r[key], str) else r[key]
        if k not in seen:
            seen.add(k)
            inputs.append(r[key])
            refs.append(r.get(ref) if ref else None)
    return inputs[:n], refs[:n]


def generation_check(model, reloaded, tok, texts: list, args) -> tuple[dict, float]:
    """Greedy tokens of two models on the same prompts (the export checks of generating tasks)."""
    import torch

    from ..inference import render_prompt

    same = total = 0
    with torch.no_grad():
        for t in texts:
            ids = (tok(t, return_tensors="pt")["input_ids"] if getattr(model.config, "is_encoder_decoder", False)
                   else torch.tensor([render_prompt(tok, t, bool(args.use_chat_template))]))
            kw = dict(max_new_tokens=16, do_sample=False)
            x = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)[0].tolist()
            y = reloaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)[0].tolist()
            n = min(len(x), len(y))
            same += sum(int(p == q) for p, q in zip(x[:n], y[:n]))
            total += max(len(x), len(y))
    agree = same / max(total, 1)
    return {"greedy_token_agreement": agree}, agree


def generation_snippet(head: list[str], cls: str, rev: str, recipe: dict, chat: bool, source: Optional[str] = None) -> str:
    """Usage snippet of a generating model; `source`: an encoder-decoder's input text."""
    import json

    max_length = recipe.get("max_length") or 512
    new_tokens = recipe.get("generation_max_new_tokens") or 64
    head = head + [f"model = {cls}.from_pretrained(repo{rev})", "model.eval()"]
    if source is not None:
        template = recipe.get("source_template")
        head += [f"source = {json.dumps(source)}" + ("  # fill in the fields of source_template" if template else ""),
                 f'inputs = tokenizer(source, truncation=True, max_length={max_length}, return_tensors="pt")',
                 "with torch.no_grad():",
                 f"    output = model.generate(**inputs, max_new_tokens={new_tokens}, do_sample=False)",
                 "print(tokenizer.decode(output[0], skip_special_tokens=True))"]
        return "\n".join(head)
    if chat:
        msgs = ([{"role": "system", "content": recipe["system_prompt"]}] if recipe.get("system_prompt") else [])
        msgs.append({"role": "user", "content": "Write a haiku about rain"})
        head += [f"messages = {json.dumps(msgs, ensure_ascii=False)}",
                 "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, "
                 'return_tensors="pt")']
    else:
        head += ['inputs = tokenizer("Write a haiku about rain", return_tensors="pt")']
    head += ["with torch.no_grad():",
             f"    output = model.generate(**inputs, max_new_tokens={new_tokens}, do_sample=False)",
             'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))']
    return "\n".join(head)


def label_kwargs(label_names: list) -> dict:
    names = [str(x) for x in label_names]
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def labelled_reload_kwargs(args) -> dict:
    """num_labels / id2label / label2id from a saved recipe's `labels`: heads are rebuilt the size they were trained."""
    return label_kwargs(args.labels) if args.labels else {}


def head_snippet(head: list[str], cls: str, adapter: bool, rev: str, recipe: dict) -> list[str]:
    """Model loading lines of a labelled-head model: peft builds the base from its own config, so the head size and
    label names are passed to an adapter's reload."""
    import json

    labels = list(recipe.get("labels") or [])
    if adapter:
        return head + [f"labels = {json.dumps(labels)}  # id order, as trained",
                       f"model = {cls}.from_pretrained(",
                       f"    repo{rev}, num_labels=len(labels), id2label=dict(enumerate(labels)),",
                       "    label2id={label: i for i, label in enumerate(labels)}, pad_token_id=tokenizer.pad_token_id)"]
    return head + [f"model = {cls}.from_pretrained(repo{rev})", "labels = model.config.id2label"]

