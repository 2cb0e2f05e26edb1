"""Seq2seq (T5 family): source built from a template over columns, target from a column, generation at eval.

SQuAD-style `answers` ({"text": [...], "answer_start": [...]}) works as a target column directly: the
first answer is trained on, all answers are references for exact match / F1.
"""

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
from ..trainers import lora_ft_trainer, mean_loss
from .base import TOKEN_KEYS, eval_rows, generation_check, generation_snippet, no_card_lines, no_data_checks, no_reload_kwargs, only_for

NAME = "seq2seq"
AUTO_CLASS = "AutoModelForSeq2SeqLM"
PEFT_CLASS = "AutoPeftModelForSeq2SeqLM"
PEFT_TASK_TYPE = "SEQ_2_SEQ_LM"
ENCODER_DECODER = True
HAS_HEAD = False
GENERATES = True
COMBINABLE = True
predict = None  # generates: `lora-ft generate`
SELECT_METRIC = "eval_f1"
COMPRESS_METRIC = "eval_f1"
SEARCH_SPACE = "learning_rate=loguniform(1e-4,3e-3) lora_r=choice(8,16,32)"
ONNX_GRAPH = "encoder-decoder"
# transformers 5 dropped the text2text-generation pipeline ("use text-generation"); the Hub tag follows it.
PIPELINE_TAG = "text-generation"
CARD_HYPER = ("source_template", "max_target_length", "generation_max_new_tokens")
SERVE_ROUTES = ("/v1/generate",)
ARCHITECTURES = ("ForConditionalGeneration", "ForSeq2SeqLM")  # config architectures served as a plain folder (T5, BART)
SERVE_FIELDS: tuple = ()
MEMORY_HEAD = "full"
reload_kwargs = no_reload_kwargs
card_lines = no_card_lines
data_checks = no_data_checks
export_check = generation_check


def recipe_problems(args, trainer: dict) -> list[str]:
    p = only_for("sequence-classification", args, also=TOKEN_KEYS)
    if trainer.get("fp16"):
        p.append("fp16: T5-family models overflow to NaN in fp16; use bf16: true or fp32")
    return p


def training_kwargs(args) -> dict:
    return {"generation_max_length": args.generation_max_new_tokens}


def encode(tok, texts: list[str], args, return_tensors: str = "pt"):
    """Sources cut at max_length, as training cut them."""
    return tok(texts, truncation=True, max_length=args.max_length, padding=True, return_tensors=return_tensors)


def verify_inputs(run_dir: Path, n: int):
    return eval_rows(run_dir, "eval_predictions.jsonl", "source", "references", n)


def verify_logits(model, tok, inputs: list[str], args) -> list:
    """First decoder step's logits for each source, cut at max_length as training cut it."""
    import torch

    out = []
    with torch.no_grad():
        for text in inputs:
            enc = encode(tok, [text], args)
            start = torch.tensor([[model.config.decoder_start_token_id]])
            out.append(model(**enc, decoder_input_ids=start).logits[0].float())
    return out


def verify_metric(logits, refs, args):
    return None


def usage_snippet(adapter: bool, cls: str, head: list[str], rev: str, recipe: dict, chat: bool) -> str:
    source = recipe.get("source_template") or "question: What color is the sky? context: The sky is blue."
    return generation_snippet(head, cls, rev, recipe, chat, source=source)


@dataclass
class PreparedData:
    train: Any
    eval: Any
    eval_sources: list = field(default_factory=list)
    eval_references: list = field(default_factory=list)  # list of acceptable answers per eval example
    notes: list = field(default_factory=list)
    train_tokens: int = 0


def template_columns(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def references(value) -> list[str]:
    """Acceptable answers: a SQuAD answers dict, a list, or one string. Nulls are no answer (never the text "None")."""
    if isinstance(value, dict) and "text" in value:
        value = value["text"]
    values = value if isinstance(value, list) else [value]
    return [str(t) for t in values if t is not None]


def source_of(row: dict, a) -> str:
    return a.source_template.format(**row) if a.source_template else str(row[a.text_column])


def _check(ds, a, where: str) -> None:
    cols = {"target_column": a.target_column}
    if a.source_template:
        cols.update({f"source_template field {{{c}}}": c for c in template_columns(a.source_template)})
    else:
        cols["text_column"] = a.text_column
    check_columns(ds, cols, where)


def _rows(ds, a, where: str, notes: list):
    before = len(ds)
    ds = ds.filter(lambda r: bool(references(r[a.target_column])) and references(r[a.target_column])[0].strip() != "")
    if len(ds) < before:
        notes.append(f"{where}: dropped {before - len(ds)} row(s) without a target")
    if len(ds) == 0:
        raise DataError(f"{where}: no rows with a non-empty {a.target_column}")
    return ds


def tokenize(ds, tok, a):
    def fn(row):
        enc = tok(source_of(row, a), truncation=True, max_length=a.max_length)
        enc["labels"] = tok(text_target=references(row[a.target_column])[0], truncation=True, max_length=a.max_target_length)["input_ids"]
        return enc

    return ds.map(fn, remove_columns=ds.column_names, desc="tokenizing")


def prepare_data(recipe, tok) -> PreparedData:
    a = recipe.args
    if not a.target_column:
        raise DataError("target_column: required for task seq2seq (e.g. answers for SQuAD)")
    seed = recipe.trainer.get("seed", 42)
    train, eval_ds, notes = load_task_train(a, seed, "train")
    _check(train, a, f"{a.dataset_name} [{a.train_split}]")
    train = _rows(train, a, "train", notes)
    if a.eval_split and eval_ds is None:
        train, eval_ds = split_off_eval(train, a.eval_size, seed)
        notes.append(f"no '{a.eval_split}' split: held out {len(eval_ds)} train rows (eval_size={a.eval_size}, seed={seed})")
    elif eval_ds is not None:
        eval_ds = apply_column_map(eval_ds, a.column_map, "eval")
        _check(eval_ds, a, f"{a.dataset_name} [{a.eval_split}]")
        eval_ds = _rows(eval_ds, a, "eval", notes)
    train = take(train, a.max_train_samples, seed)
    srcs, refs = [], []
    if eval_ds is not None:
        eval_ds = take(eval_ds, a.max_eval_samples, seed)
        srcs = [source_of(r, a) for r in eval_ds]
        refs = [references(r[a.target_column]) for r in eval_ds]
    train_tok = tokenize(train, tok, a)
    eval_tok = tokenize(eval_ds, tok, a) if eval_ds is not None else None
    n = int(sum(len(x) + len(y) for x, y in zip(train_tok["input_ids"], train_tok["labels"])))
    return PreparedData(train_tok, eval_tok, srcs, refs, notes, n)


def model_kwargs(data) -> dict:
    return {}


def setup_model(model, tok) -> None:
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))


def _decode(tok, ids) -> list[str]:
    import numpy as np

    ids = np.where(np.asarray(ids) < 0, tok.pad_token_id, ids)
    return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]


def build_trainer(model, tok, training_args, data: PreparedData, callbacks):
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer

    from ..metrics import qa_scores

    def compute_metrics(eval_pred):
        preds = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        return qa_scores(_decode(tok, preds), data.eval_references[: len(preds)])

    return mean_loss(lora_ft_trainer(Seq2SeqTrainer)(
        model=model, args=training_args, train_dataset=data.train, eval_dataset=data.eval, processing_class=tok,
        data_collator=DataCollatorForSeq2Seq(tok, model=model, pad_to_multiple_of=8),
        compute_metrics=compute_metrics if training_args.predict_with_generate else None, callbacks=callbacks,
    ))


def final_eval(trainer, data: PreparedData, run_dir: Path) -> dict:
    from ..metrics import qa_scores

    out = trainer.predict(data.eval, metric_key_prefix="eval")
    preds = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    texts = _decode(trainer.processing_class, preds) if trainer.args.predict_with_generate else []
    m = {"eval_loss": out.metrics.get("eval_loss"), "eval_samples": len(data.eval)}
    if texts:
        m.update({f"eval_{k}": v for k, v in qa_scores(texts, data.eval_references).items()})
        if trainer.is_world_process_zero():
            with open(run_dir / "eval_predictions.jsonl", "w", encoding="utf-8") as fh:
                for s, p, r in zip(data.eval_sources, texts, data.eval_references):
                    fh.write(json.dumps({"source": s, "prediction": p, "references": r}, ensure_ascii=False) + "\n")
    return m


def evaluate_run(model, tok, recipe, split: Optional[str] = None) -> dict:
    """`lora-ft eval` for a seq2seq run: EM / F1 / ROUGE-L of greedy generations on a split."""
    from ..inference import generate_texts
    from ..metrics import qa_scores

    a = recipe.args
    split = split or a.eval_split or "test"
    ds = apply_column_map(load_eval_split(a.dataset_name, split, a.dataset_config), a.column_map, split)
    _check(ds, a, f"{a.dataset_name} [{split}]")
    ds = take(_rows(ds, a, split, []), a.max_eval_samples, recipe.trainer.get("seed", 42))
    outs = generate_texts(model, tok, [source_of(r, a) for r in ds], max_new_tokens=a.generation_max_new_tokens,
                          max_length=a.max_length)
    scores = qa_scores([o["completion"] for o in outs], [references(r[a.target_column]) for r in ds])
    return {**{f"eval_{k}": v for k, v in scores.items()}, "eval_samples": len(ds), "dataset": a.dataset_name, "split": split}
