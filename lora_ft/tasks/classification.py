"""Sequence classification: encoders (BERT, MiniLM) and decoders (GPT-2, Llama) with a trained, saved head."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..data import (
    apply_column_map,
    check_columns,
    load_eval_split,
    load_task_train,
    split_off_eval,
    take,
)
from ..errors import DataError
from ..textprep import clean_text
from ..trainers import lora_ft_trainer, mean_loss
from .base import TOKEN_KEYS, eval_rows, head_snippet, labelled_reload_kwargs, no_data_checks, only_for

NAME = "sequence-classification"
AUTO_CLASS = "AutoModelForSequenceClassification"
PEFT_CLASS = "AutoPeftModelForSequenceClassification"
PEFT_TASK_TYPE = "SEQ_CLS"
ENCODER_DECODER = False
HAS_HEAD = True
GENERATES = False
COMBINABLE = False  # each run has its own trained head, which no weighting of adapters can combine
SELECT_METRIC = "eval_accuracy"
COMPRESS_METRIC = "eval_accuracy"
SEARCH_SPACE = "learning_rate=loguniform(1e-4,3e-3) lora_r=choice(8,16,32) warmup_steps=choice(0.0,0.1)"
ONNX_GRAPH = "logits"
PIPELINE_TAG = "text-classification"
CARD_HYPER: tuple = ()
SERVE_ROUTES = ("/v1/classify",)
ARCHITECTURES = ("ForSequenceClassification",)  # config architectures this task serves as a plain folder
SERVE_FIELDS = ("label", "score", "scores")
MEMORY_HEAD = "none"
reload_kwargs = labelled_reload_kwargs
data_checks = no_data_checks


def recipe_problems(args, trainer: dict) -> list[str]:
    p = only_for("token-classification", args, keys=(), also=TOKEN_KEYS)
    if args.source_template:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(args.source_template) if f]
        except ValueError as e:  # a lone brace: str.format would fail on the first example
            return p + [f"source_template: not a format string ({e}); write literal braces as {{{{ and }}}}"]
        if fields != [args.text_column]:
            p.append(f"source_template: a classification template holds {{{args.text_column}}} (the text_column) exactly once, got {fields or 'no field'}")
    return p


def training_kwargs(args) -> dict:
    return {}


@dataclass
class PreparedData:
    train: Any  # tokenized datasets.Dataset
    eval: Any
    label_names: list[str]
    eval_texts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    train_tokens: int = 0  # non-pad tokens in one pass over train


def _is_empty(v) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _drop_empty(ds, cols: list[str], where: str, notes: list[str]):
    before = len(ds)
    ds = ds.filter(lambda row: not any(_is_empty(row[c]) for c in cols), desc=f"dropping empty rows ({where})")
    if len(ds) < before:
        notes.append(f"{where}: dropped {before - len(ds)} empty row(s)")
    if len(ds) == 0:
        raise DataError(f"{where}: no rows left after dropping empty ones; check text_column/label_column")
    return ds


def label_names_for(train, label_column: str, labels: Optional[list]) -> list[str]:
    import numpy as np

    if labels is not None:
        return [str(x) for x in labels]
    values = set(train[label_column])
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def encode_labels(ds, label_column: str, names: list[str], where: str):
    """Map label values (names, or integer ids into `names`) to ids; anything outside the set is an error.

    Where the names are themselves numbers (`labels: [1, 2, 3, 4, 5]`), an integer is only ever a name: read as a
    position as well, data 0..4 was half shifted by one and half taken as is, without a word.
    """
    import numpy as np

    index = {n: i for i, n in enumerate(names)}
    numeric_names = all(n.strip().lstrip("-").isdigit() for n in names)

    def to_id(v):
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            if str(v) in index:
                return index[str(v)]
            if not numeric_names and 0 <= int(v) < len(names):
                return int(v)
            return None
        return index.get(str(v).strip(), None)

    ids = [to_id(v) for v in ds[label_column]]
    bad = sorted({str(v) for v, i in zip(ds[label_column], ids) if i is None})
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        if numeric_names and all(str(v).strip().lstrip("-").isdigit() for v in bad):
            raise DataError(f"{label_column} in {where}: label(s) {shown} not in labels [{', '.join(names)}]; these names are "
                            "numbers, so data values are matched as names, never as positions: list the values the data "
                            "holds in `labels:` (e.g. [0, 1, ...]) or fix the data")
        raise DataError(f"{label_column} in {where}: label(s) {shown} not in labels [{', '.join(names)}]; add them to `labels:` or fix the data")
    return ds.remove_columns([c for c in ["labels"] if c in ds.column_names]).add_column("labels", ids)


def prepare_data(recipe, tokenizer) -> PreparedData:
    a = recipe.args
    seed = recipe.trainer.get("seed", 42)
    train, eval_ds, notes = load_task_train(a, seed, f"{a.dataset_name} [{a.train_split}]")
    cols = {"text_column": a.text_column, "text_pair_column": a.text_pair_column, "label_column": a.label_column}
    check_columns(train, cols, f"{a.dataset_name} [{a.train_split}]")
    used = [c for c in (a.text_column, a.text_pair_column, a.label_column) if c]
    train = _drop_empty(train, used, "train", notes)
    names = label_names_for(train, a.label_column, a.labels)
    train = encode_labels(train, a.label_column, names, f"{a.dataset_name} [{a.train_split}]")
    if a.eval_split and eval_ds is None:
        train, eval_ds = split_off_eval(train, a.eval_size, seed, stratify_by=None)
        notes.append(f"no '{a.eval_split}' split: held out {len(eval_ds)} train rows (eval_size={a.eval_size}, seed={seed})")
    elif eval_ds is not None:
        eval_ds = apply_column_map(eval_ds, a.column_map, f"{a.dataset_name} [{a.eval_split}]")
        check_columns(eval_ds, cols, f"{a.dataset_name} [{a.eval_split}]")
        eval_ds = _drop_empty(eval_ds, used, "eval", notes)
        eval_ds = encode_labels(eval_ds, a.label_column, names, f"{a.dataset_name} [{a.eval_split}]")
    train = _row_filters(train, eval_ds, a, notes)
    train = take(train, a.max_train_samples, seed)
    if eval_ds is not None:
        eval_ds = take(eval_ds, a.max_eval_samples, seed)
    if a.augment:
        train = _augment(train, a, tokenizer, seed, notes)
    eval_texts = list(eval_ds[a.text_column]) if eval_ds is not None else []
    train_tok = tokenize(train, tokenizer, a)
    eval_tok = tokenize(eval_ds, tokenizer, a) if eval_ds is not None else None
    train_tokens = int(sum(len(x) for x in train_tok["input_ids"]))
    return PreparedData(train_tok, eval_tok, names, eval_texts, notes, train_tokens)


def render_texts(texts: list, a) -> list[str]:
    """The model's input: each text cleaned as the recipe says, then through `source_template` if it has one
    (training, eval and serving alike: the saved recipe carries both)."""
    texts = [clean_text(str(t), a) for t in texts]
    if not a.source_template:
        return texts
    return [a.source_template.format(**{a.text_column: t}) for t in texts]


def _row_filters(train, eval_ds, a, notes: list[str]):
    """drop_duplicates and drop_eval_leaks, comparing texts as the model will see them (after cleaning)."""
    key = lambda row: (clean_text(str(row[a.text_column]), a).strip(), str(row.get(a.text_pair_column) or ""))  # noqa: E731
    if a.drop_duplicates:
        seen: set = set()
        keep = []
        for i, row in enumerate(train):
            k = (key(row), row["labels"])
            if k not in seen:
                seen.add(k)
                keep.append(i)
        if len(keep) < len(train):
            notes.append(f"drop_duplicates: dropped {len(train) - len(keep)} repeated train row(s)")
            train = train.select(keep)
    if a.drop_eval_leaks and eval_ds is not None:
        held = {key(row) for row in eval_ds}
        keep = [i for i, row in enumerate(train) if key(row) not in held]
        if len(keep) < len(train):
            notes.append(f"drop_eval_leaks: dropped {len(train) - len(keep)} train row(s) whose text is in the eval split")
            train = train.select(keep)
    if len(train) == 0:
        raise DataError("train: no rows left after drop_duplicates / drop_eval_leaks")
    return train


def _augment(train, a, tokenizer, seed: int, notes: list[str]):
    import datasets

    from ..modeling import resolve_model_path
    from ..textprep import EmbeddingSynonyms, augment_rows, load_input_embeddings, parse_augment

    ops = parse_augment(a.augment)
    synonyms = None
    if {"synonym", "insert"} & set(ops):
        synonyms = EmbeddingSynonyms(tokenizer, load_input_embeddings(resolve_model_path(a.model_name_or_path)))
    rows = augment_rows([str(t) for t in train[a.text_column]], ops, a.augment_copies, seed, synonyms)
    if not rows:
        return train
    extra = train.select([i for i, _ in rows]).remove_columns([a.text_column])
    extra = extra.add_column(a.text_column, [t for _, t in rows]).cast(train.features)
    notes.append(f"augment {a.augment} x{a.augment_copies}: +{len(rows)} train rows (from {len(train)})")
    return datasets.concatenate_datasets([train, extra]).shuffle(seed=seed)


def tokenize(ds, tokenizer, a):
    def fn(batch):
        pair = batch[a.text_pair_column] if a.text_pair_column else None
        return tokenizer(render_texts(batch[a.text_column], a), pair, truncation=True, max_length=a.max_length)

    keep = {"labels"}
    return ds.map(fn, batched=True, remove_columns=[c for c in ds.column_names if c not in keep], desc="tokenizing")


def model_kwargs(data: PreparedData) -> dict:
    return label_kwargs(data.label_names)


def label_kwargs(label_names: list[str]) -> dict:
    return {
        "num_labels": len(label_names),
        "id2label": {i: n for i, n in enumerate(label_names)},
        "label2id": {n: i for i, n in enumerate(label_names)},
    }


def setup_model(model, tokenizer) -> None:
    """Decoder classifiers find the last real token through pad_token_id: it must be in the config."""
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


def init_head_from_label_words(model, tokenizer, label_names: list[str], model_name_or_path: str) -> None:
    """Start the head as the LM's own next-token scores for the label words: a zero-shot classifier to fine-tune.

    Row i of the head becomes the output-embedding row of the first token of " <label i>", so with a source_template
    ending in a cue ("Sentiment:") the untrained head already ranks labels as the language model would.
    """
    import torch

    from ..errors import RecipeError
    from ..modeling import resolve_model_path

    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear):
        raise RecipeError([f"head_init: label_words needs a decoder LM classifier (a `score` head); {type(model).__name__} has none"])
    ids = [tokenizer(" " + name, add_special_tokens=False)["input_ids"][0] for name in label_names]
    if len(set(ids)) < len(ids):
        raise RecipeError([f"head_init: labels {label_names} share a first token; rename them apart or use head_init: random"])
    if getattr(model.config, "tie_word_embeddings", False):
        rows = model.get_input_embeddings().weight[ids]
    else:  # the classification model dropped lm_head: read its rows from the checkpoint
        from safetensors import safe_open

        rows = None
        for f in sorted(Path(resolve_model_path(model_name_or_path)).glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                if "lm_head.weight" in st.keys():
                    rows = st.get_slice("lm_head.weight")[ids]
        if rows is None:
            raise RecipeError([f"head_init: no lm_head.weight in {model_name_or_path}; use head_init: random"])
    with torch.no_grad():
        head.weight.copy_(rows.to(head.weight.dtype))
        if head.bias is not None:
            head.bias.zero_()


def compute_metrics(eval_pred) -> dict:
    import numpy as np

    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    preds = np.asarray(logits).argmax(-1)
    from sklearn.metrics import accuracy_score, f1_score

    labels = eval_pred.label_ids
    return {"accuracy": float(accuracy_score(labels, preds)), "macro_f1": float(f1_score(labels, preds, average="macro"))}


def build_trainer(model, tokenizer, training_args, data: PreparedData, callbacks):
    from transformers import DataCollatorWithPadding, Trainer

    return mean_loss(lora_ft_trainer(Trainer)(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    ))


def final_eval(trainer, data: PreparedData, run_dir: Path) -> dict:
    """Full report on the eval split: metrics JSON, confusion matrix PNG, predictions JSONL."""
    import numpy as np

    from ..metrics import classification_report, softmax
    from ..plots import plot_confusion_matrix

    out = trainer.predict(data.eval, metric_key_prefix="eval")  # in row order: build_trainer uses lora_ft_trainer
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    probs = softmax(np.asarray(logits, dtype=np.float64))
    preds = probs.argmax(-1)
    report = classification_report(out.label_ids, preds, data.label_names)
    if trainer.is_world_process_zero():
        with open(run_dir / "eval_predictions.jsonl", "w", encoding="utf-8") as fh:
            for text, y, p, pr in zip(data.eval_texts, out.label_ids, preds, probs):
                fh.write(json.dumps({"text": text, "label": data.label_names[int(y)], "pred": data.label_names[int(p)],
                                     "score": float(pr[p])}, ensure_ascii=False) + "\n")
        (run_dir / "confusion_matrix.json").write_text(json.dumps(report["confusion_matrix"], indent=2))
        plot_confusion_matrix(report["confusion_matrix"], run_dir / "confusion_matrix.png")
    metrics = {"eval_loss": out.metrics.get("eval_loss"), "eval_accuracy": report["accuracy"], "eval_macro_f1": report["macro_f1"],
               "eval_per_class": report["per_class"], "eval_samples": len(preds)}
    return metrics


def evaluate_run(model, tok, recipe, split: Optional[str] = None) -> dict:
    """`lora-ft eval`: metrics of a trained run on a split of any dataset with the recipe's columns."""
    from ..metrics import classification_report

    a = recipe.args
    split = split or a.eval_split or "test"
    ds = load_eval_split(a.dataset_name, split, a.dataset_config)  # a lone file is scored whole
    where = f"{a.dataset_name} [{split}]"
    ds = apply_column_map(ds, a.column_map, where)
    check_columns(ds, {"text_column": a.text_column, "text_pair_column": a.text_pair_column, "label_column": a.label_column}, where)
    used = [c for c in (a.text_column, a.text_pair_column, a.label_column) if c]
    ds = _drop_empty(ds, used, where, [])
    ds = take(ds, a.max_eval_samples, recipe.trainer.get("seed", 42))
    ds = encode_labels(ds, a.label_column, list(a.labels), where)
    texts = [str(t) for t in ds[a.text_column]]
    pairs = [str(t) for t in ds[a.text_pair_column]] if a.text_pair_column else None
    preds = predict(model, tok, texts, recipe, pairs=pairs)
    index = {n: i for i, n in enumerate(a.labels)}
    report = classification_report(ds["labels"], [index[p["label"]] for p in preds], list(a.labels))
    return {"eval_accuracy": report["accuracy"], "eval_macro_f1": report["macro_f1"], "eval_per_class": report["per_class"],
            "eval_confusion_matrix": report["confusion_matrix"], "eval_samples": len(preds), "dataset": a.dataset_name, "split": split}


# ---------------------------------------------------------------- inference: one encoding for every caller


def encode(tok, texts: list, args, pairs: Optional[list] = None, return_tensors: str = "pt"):
    """The model's input for texts, exactly as training built it (cleaning, source_template, truncation): eval,
    predict, serve, merge verification and the export checks all call this."""
    return tok(render_texts(texts, args), pairs, truncation=True, max_length=args.max_length, padding=True,
               return_tensors=return_tensors)


def predict(model, tok, texts: list[str], recipe, batch_size: int = 32, pairs: Optional[list[str]] = None) -> list[dict]:
    """One {"text", "label", "score", "scores"} per text, in input order."""
    import torch

    names = [model.config.id2label[i] for i in range(len(model.config.id2label))] if not recipe.args.labels else list(recipe.args.labels)
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        pair = pairs[i : i + batch_size] if pairs else None
        enc = encode(tok, chunk, recipe.args, pair).to(device)
        with torch.no_grad():
            probs = model(**enc).logits.float().softmax(-1).cpu()
        for text, row in zip(chunk, probs):
            j = int(row.argmax())
            out.append({"text": text, "label": names[j], "score": round(float(row[j]), 6),
                        "scores": {n: round(float(v), 6) for n, v in zip(names, row.tolist())}})
    return out


def verify_inputs(run_dir: Path, n: int):
    return eval_rows(run_dir, "eval_predictions.jsonl", "text", "label", n)


def verify_logits(model, tok, inputs: list[str], args) -> list:
    """Per-text classifier logits on the inputs predict gives the model (cleaned, through source_template)."""
    import torch

    with torch.no_grad():
        return [model(**encode(tok, [t], args)).logits[0].float() for t in inputs]


def verify_metric(logits, refs, args):
    if not refs or refs[0] is None:
        return None
    labels = list(args.labels or [])
    preds = [labels[int(x.argmax())] for x in logits]
    return "accuracy", sum(p == r for p, r in zip(preds, refs)) / len(refs)


def export_check(model, reloaded, tok, texts: list[str], args) -> tuple[dict, float]:
    import torch

    enc = encode(tok, texts, args)
    with torch.no_grad():
        a, b = model(**enc).logits.float(), reloaded(**enc).logits.float()
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    return {"label_agreement": agree, "max_abs_prob_diff": float((a.softmax(-1) - b.softmax(-1)).abs().max())}, agree


# ---------------------------------------------------------------- hub


def card_lines(recipe: dict) -> list[str]:
    labels = recipe.get("labels")
    return ["- **Labels (id order):** " + ", ".join(f"`{i}`: {lab}" for i, lab in enumerate(labels))] if labels else []


def usage_snippet(adapter: bool, cls: str, head: list[str], rev: str, recipe: dict, chat: bool) -> str:
    max_length = recipe.get("max_length") or 512
    return "\n".join(head_snippet(head, cls, adapter, rev, recipe) + [
        "model.eval()",
        f'inputs = tokenizer(["what a great day"], truncation=True, max_length={max_length}, return_tensors="pt")',
        "with torch.no_grad():",
        "    probs = model(**inputs).logits.softmax(-1)[0]",
        "print(labels[int(probs.argmax())], float(probs.max()))"])
