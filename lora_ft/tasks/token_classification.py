"""Token classification (NER): word-level tags, aligned to subwords through the fast tokenizer's word_ids().

Data are sentences as word lists with one tag per word (JSONL/JSON/Parquet/CSV or CoNLL column files). Tags are
converted to IOB2 (the scheme is detected or set with `tag_scheme`), the first subword of each word carries the
word's label and the rest -100 (or I-X with `label_all_tokens`). Raw texts are split into words the same way at
inference (lora_ft.tags.split_words), so training, eval, predict, serve, merge and export see one encoding.
Words cut by max_length are counted in the notes and scored as O at eval, never dropped without a word.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..data import CONLL_LINE, apply_column_map, check_columns, load_eval_split, load_task_train, split_off_eval, take
from ..errors import DataError
from ..tags import SCHEMES, detect_scheme, join_words, label_order, spans, split_words, to_iob2
from ..trainers import lora_ft_trainer, mean_loss
from .base import eval_rows, head_snippet, label_kwargs, labelled_reload_kwargs, no_data_checks, only_for

NAME = "token-classification"
AUTO_CLASS = "AutoModelForTokenClassification"
PEFT_CLASS = "AutoPeftModelForTokenClassification"
PEFT_TASK_TYPE = "TOKEN_CLS"
ENCODER_DECODER = False
HAS_HEAD = True
GENERATES = False
COMBINABLE = False  # each run has its own trained head
SELECT_METRIC = "eval_f1"
COMPRESS_METRIC = "eval_f1"
SEARCH_SPACE = "learning_rate=loguniform(1e-4,3e-3) lora_r=choice(8,16,32)"
ONNX_GRAPH = "token-logits"
PIPELINE_TAG = "token-classification"
CARD_HYPER = ("tag_scheme", "label_all_tokens")
SERVE_ROUTES = ("/v1/token-classify",)
ARCHITECTURES = ("ForTokenClassification",)  # config architectures this task serves as a plain folder
SERVE_FIELDS = ("entities",)
MEMORY_HEAD = "none"
reload_kwargs = labelled_reload_kwargs
data_checks = no_data_checks


@dataclass
class PreparedData:
    train: Any
    eval: Any
    label_names: list[str]
    eval_words: list = field(default_factory=list)  # per eval sentence: its words
    eval_gold: list = field(default_factory=list)  # per eval sentence: IOB2 tags of every word
    eval_first: list = field(default_factory=list)  # per eval sentence: token position of each kept word's first subword
    notes: list = field(default_factory=list)
    train_tokens: int = 0


def recipe_problems(args, trainer: dict) -> list[str]:
    p = only_for("sequence-classification", args)
    if args.tag_scheme != "auto" and args.tag_scheme not in SCHEMES:
        p.append(f"tag_scheme: '{args.tag_scheme}' is not one of auto, {', '.join(SCHEMES)}")
    if args.source_template:
        p.append("source_template: token-classification inputs are the words themselves; remove source_template")
    return p


def training_kwargs(args) -> dict:
    return {}


def model_kwargs(data: PreparedData) -> dict:
    return label_kwargs(data.label_names)


def setup_model(model, tokenizer) -> None:
    """Decoder token classifiers batch with padding too: pad_token_id must be in the config, as for classification."""
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


# ---------------------------------------------------------------- data


def _rows(ds, a, where: str, names: Optional[list[str]], notes: list[str]):
    """(words, tags as strings) per sentence, checked: lengths match, ints are known ids, empty sentences dropped."""
    if CONLL_LINE in ds.column_names:  # a CoNLL file names its columns tokens / ner_tags: the recipe's names apply
        ds = ds.rename_columns({k: v for k, v in (("tokens", a.tokens_column), ("ner_tags", a.tags_column)) if k != v})
    check_columns(ds, {"tokens_column": a.tokens_column, "tags_column": a.tags_column}, where)
    feature = getattr(ds.features[a.tags_column], "feature", None)
    hub_names = list(feature.names) if hasattr(feature, "names") else None
    id_names = [str(x) for x in names] if names else hub_names
    lines = ds[CONLL_LINE] if CONLL_LINE in ds.column_names else None
    line_word = "row"  # one sentence per row (a JSONL file: per line)
    words, tags, locs = [], [], []  # locs: (where, CoNLL line of the first word or None, row) per sentence
    dropped = 0
    for i, (ws, ts) in enumerate(zip(ds[a.tokens_column], ds[a.tags_column])):
        loc = f"{where} line {lines[i]}" if lines is not None else f"{where} {line_word} {i + 1}"
        if not isinstance(ws, list) or not isinstance(ts, list):
            raise DataError(f"{loc}: {a.tokens_column} and {a.tags_column} must be lists (one entry per word)")
        if not ws:
            dropped += 1
            continue
        if len(ws) != len(ts):
            raise DataError(f"{loc}: {len(ws)} words but {len(ts)} tags; give one tag per word")
        out = []
        for t in ts:
            if isinstance(t, bool) or not isinstance(t, (int, str)):
                raise DataError(f"{loc}: tag {t!r} is neither a tag name nor an integer id")
            if isinstance(t, int):
                if id_names is None:
                    raise DataError(f"{loc}: integer tags need their names: list them in `labels:` (id order)")
                if not 0 <= t < len(id_names):
                    raise DataError(f"{loc}: tag id {t} outside labels [{', '.join(id_names)}]")
                t = id_names[t]
            out.append(str(t).strip())
        words.append([str(w) for w in ws]), tags.append(out)
        locs.append((where, lines[i] if lines is not None else None, f"{line_word} {i + 1}"))
    if dropped:
        notes.append(f"{where}: dropped {dropped} empty sentence(s)")
    if not words:
        raise DataError(f"{where}: no sentences; check tokens_column/tags_column")
    return words, tags, locs


def _iob2(words_tags: list, a, notes: list[str]) -> str:
    """Detect (or check) the scheme over every split together, convert each split's tags to IOB2 in place."""
    all_tags = [t for _, tags, _ in words_tags for t in tags]
    all_locs = [loc for _, _, locs in words_tags for loc in locs]

    def where(i, j):  # a CoNLL file has one word per line; other formats one sentence per row
        file, line, row = all_locs[i]
        return f"{file} line {line + j}" if line is not None else f"{file} {row}, word {j + 1}"

    scheme = detect_scheme(all_tags, a.tag_scheme, where)
    if scheme != "IOB2":
        notes.append(f"tag_scheme: {scheme}{' detected' if a.tag_scheme == 'auto' else ''}; tags converted to IOB2")
        for _, tags, _ in words_tags:
            tags[:] = [to_iob2(t, scheme) for t in tags]
    return scheme


def encode(tok, inputs: list, args, return_tensors: Optional[str] = "pt"):
    """The model's input: each item (a raw text, or a list of words) as words through is_split_into_words.
    Training, eval, predict, serve, merge verification and export all call this."""
    words = [split_words(x)[0] if isinstance(x, str) else list(x) for x in inputs]
    if spaced_words(tok):
        words = [[w if i == 0 else " " + w for i, w in enumerate(ws)] for ws in words]
    return tok(words, is_split_into_words=True, truncation=True, max_length=args.max_length,
               padding=bool(return_tensors), return_tensors=return_tensors)


def spaced_words(tok) -> bool:
    """Byte-level BPE (GPT-2, SmolLM2, Llama 3) without add_prefix_space tokenizes each split word as if it began the
    text: 'Merkel' -> M erk el, where running text has ĠMerkel. A leading space on every word but the first gives
    exactly the running text's tokens (checked on SmolLM2), so the model sees words as it was pretrained on them."""
    pre = repr(getattr(getattr(tok, "backend_tokenizer", None), "pre_tokenizer", None))
    return "ByteLevel(" in pre and "add_prefix_space=False" in pre


def first_positions(word_ids: list) -> list[int]:
    """Token position of each word's first subword, in word order (words cut by truncation have none)."""
    seen, out = set(), []
    for pos, w in enumerate(word_ids):
        if w is not None and w not in seen:
            seen.add(w)
            out.append(pos)
    return out


def _tokenize(words, tags, tok, a, index: dict, where: str, notes: list[str]):
    import datasets

    enc = encode(tok, words, a, return_tensors=None)
    labels, firsts, cut, vanished, cut_sents = [], [], 0, 0, 0
    cont = {i: index.get("I-" + n[2:], i) if n.startswith("B-") else i for n, i in index.items()}
    for k, (ws, ts) in enumerate(zip(words, tags)):
        wids = enc.word_ids(k)
        prev, lab = None, []
        for w in wids:
            if w is None:
                lab.append(-100)
            elif w != prev:
                lab.append(index[ts[w]])
            else:
                lab.append(cont[index[ts[w]]] if a.label_all_tokens else -100)
            prev = w
        present = {w for w in wids if w is not None}
        last = max(present) + 1 if present else 0
        cut += len(ws) - last
        cut_sents += int(last < len(ws))
        vanished += sum(1 for w in range(last) if w not in present)
        labels.append(lab)
        firsts.append(first_positions(wids))
    if cut:
        notes.append(f"{where}: truncation at max_length {a.max_length} cut {cut} word(s) from {cut_sents} sentence(s); "
                     "eval scores cut words as O; raise max_length to keep them")
    if vanished:
        notes.append(f"{where}: {vanished} word(s) gave the tokenizer no tokens (unlabelled, scored as O at eval)")
    ds = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return ds, firsts


def prepare_data(recipe, tokenizer) -> PreparedData:
    a = recipe.args
    seed = recipe.trainer.get("seed", 42)
    train, eval_ds, notes = load_task_train(a, seed, f"{a.dataset_name} [{a.train_split}]")
    if a.eval_split and eval_ds is None:
        train, eval_ds = split_off_eval(train, a.eval_size, seed)
        notes.append(f"no '{a.eval_split}' split: held out {len(eval_ds)} train sentences (eval_size={a.eval_size}, seed={seed})")
    elif eval_ds is not None:
        eval_ds = apply_column_map(eval_ds, a.column_map, f"{a.dataset_name} [{a.eval_split}]")
    train = take(train, a.max_train_samples, seed)
    eval_ds = take(eval_ds, a.max_eval_samples, seed) if eval_ds is not None else None
    parts = [_rows(train, a, f"{a.dataset_name} [{a.train_split}]", a.labels, notes)]
    if eval_ds is not None:
        parts.append(_rows(eval_ds, a, f"{a.dataset_name} [{a.eval_split}]", a.labels, notes))
    scheme = _iob2(parts, a, notes)
    names = _label_names(parts, a, scheme)
    index = {n: i for i, n in enumerate(names)}
    train_tok, _ = _tokenize(parts[0][0], parts[0][1], tokenizer, a, index, "train", notes)
    data = PreparedData(train_tok, None, names, notes=notes, train_tokens=int(sum(len(x) for x in train_tok["input_ids"])))
    if eval_ds is not None:
        data.eval, data.eval_first = _tokenize(parts[1][0], parts[1][1], tokenizer, a, index, "eval", notes)
        data.eval_words, data.eval_gold = parts[1][0], parts[1][1]
    return data


def _label_names(parts, a, scheme: str) -> list[str]:
    """IOB2 tag names in id order: from `labels:` (BIOES names mapped as the data: S- to B-, E- to I-), else every
    tag the splits hold."""
    found = label_order(t for _, tags, _ in parts for s in tags for t in s)
    if not a.labels:
        # every B-X gets its I-X too: label_all_tokens and predictions on later subwords need it
        return label_order(found + ["I-" + t[2:] for t in found if t.startswith("B-")])
    bioes = {"S": "B", "E": "I"} if scheme == "BIOES" else {}
    names = list(dict.fromkeys(bioes.get(str(x)[:1], str(x)[:1]) + str(x)[1:] for x in a.labels))
    missing = [t for t in found if t not in names]
    if missing:
        raise DataError(f"{a.tags_column}: tag(s) {', '.join(missing[:5])} not in labels [{', '.join(names)}]; add them to `labels:` or fix the data")
    return names


# ---------------------------------------------------------------- training and eval


def _word_tags(logits, firsts: list[int], n_words: int, names: list[str]) -> list[str]:
    """IOB2 tags of a sentence's words from per-token logits: the first subword decides; cut words are O."""
    import numpy as np

    ids = np.asarray(logits)[firsts].argmax(-1) if firsts else []
    return [names[int(i)] for i in ids] + ["O"] * (n_words - len(firsts))


def build_trainer(model, tokenizer, training_args, data: PreparedData, callbacks):
    from transformers import DataCollatorForTokenClassification, Trainer

    from ..metrics import entity_report

    def compute_metrics(eval_pred):  # rows arrive in eval order (lora_ft_trainer): index them with data.eval_first
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        pred = [_word_tags(lg, f, len(g), data.label_names) for lg, f, g in zip(logits, data.eval_first, data.eval_gold)]
        r = entity_report(data.eval_gold[: len(pred)], pred)
        return {k: r[k] for k in ("precision", "recall", "f1", "token_accuracy")}

    return mean_loss(lora_ft_trainer(Trainer)(
        model=model, args=training_args, train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
        data_collator=DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=8),
        compute_metrics=compute_metrics if data.eval is not None else None, callbacks=callbacks,
    ))


def _entities(tags: list[str], words: list[str], offsets: list[tuple[int, int]], text: str, scores=None) -> list[dict]:
    """transformers' token-classification pipeline shape (aggregation_strategy="simple"), at word level."""
    out = []
    for typ, a, b in spans(tags):
        s, e = offsets[a][0], offsets[b - 1][1]
        row = {"entity_group": typ, "word": text[s:e], "start": s, "end": e}
        if scores is not None:
            row["score"] = round(float(sum(scores[a:b]) / (b - a)), 6)
        out.append(row)
    return out


def _metrics(report: dict) -> dict:
    return {"eval_precision": report["precision"], "eval_recall": report["recall"], "eval_f1": report["f1"],
            "eval_token_accuracy": report["token_accuracy"], "eval_per_type": report["per_type"]}


def final_eval(trainer, data: PreparedData, run_dir: Path) -> dict:
    """Entity metrics on the eval split, the entity-type confusion PNG, predictions JSONL with gold and predicted spans."""
    from ..metrics import entity_report
    from ..plots import plot_confusion_matrix

    out = trainer.predict(data.eval, metric_key_prefix="eval")
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    pred = [_word_tags(lg, f, len(g), data.label_names) for lg, f, g in zip(logits, data.eval_first, data.eval_gold)]
    report = entity_report(data.eval_gold, pred)
    if trainer.is_world_process_zero():
        _write_predictions(run_dir, data.eval_words, data.eval_gold, pred)
        (run_dir / "confusion_matrix.json").write_text(json.dumps(report["confusion_matrix"], indent=2))
        plot_confusion_matrix(report["confusion_matrix"], run_dir / "confusion_matrix.png")
    return {"eval_loss": out.metrics.get("eval_loss"), **_metrics(report), "eval_samples": len(pred)}


def _write_predictions(run_dir: Path, words, gold, pred) -> None:
    with open(run_dir / "eval_predictions.jsonl", "w", encoding="utf-8") as fh:
        for ws, g, p in zip(words, gold, pred):
            text, offsets = join_words(ws)
            fh.write(json.dumps({"text": text, "tokens": ws, "tags": g, "pred_tags": p,
                                 "gold_entities": _entities(g, ws, offsets, text),
                                 "pred_entities": _entities(p, ws, offsets, text)}, ensure_ascii=False) + "\n")


def _word_logits(model, tok, items: list, args, batch_size: int = 32):
    """Per item: (words, offsets, text, logits of each kept word's first subword). The one inference path."""
    import torch

    device = next(model.parameters()).device
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        rows = []
        for x in chunk:
            if isinstance(x, str):
                rows.append((*split_words(x), x))
            else:
                text, offsets = join_words([str(w) for w in x])
                rows.append(([str(w) for w in x], offsets, text))
        todo = [k for k, r in enumerate(rows) if r[0]]
        logits = {}
        if todo:
            enc = encode(tok, [rows[k][0] for k in todo], args)
            with torch.no_grad():
                lg = model(**{k: v.to(device) for k, v in enc.items()}).logits.float().cpu()
            for j, k in enumerate(todo):
                logits[k] = lg[j, first_positions(enc.word_ids(j))]
        for k, (ws, offsets, text) in enumerate(rows):
            out.append((ws, offsets, text, logits.get(k, torch.zeros(0, model.config.num_labels))))
    return out


def predict(model, tok, texts: list, recipe, batch_size: int = 32) -> list[dict]:
    """One {"text", "entities": [{"entity_group", "word", "start", "end", "score"}]} per text (or word list);
    start/end are character offsets into the text (a word list is joined with single spaces)."""
    names = _names(model, recipe)
    out = []
    for ws, offsets, text, lg in _word_logits(model, tok, texts, recipe.args, batch_size):
        probs = lg.softmax(-1)
        ids = probs.argmax(-1).tolist()
        tags = [names[i] for i in ids] + ["O"] * (len(ws) - len(ids))
        scores = [float(probs[j, i]) for j, i in enumerate(ids)] + [0.0] * (len(ws) - len(ids))
        out.append({"text": text, "entities": _entities(tags, ws, offsets, text, scores)})
    return out


def _names(model, recipe) -> list[str]:
    if recipe.args.labels:
        return [str(x) for x in recipe.args.labels]
    return [model.config.id2label[i] for i in range(len(model.config.id2label))]


def evaluate_run(model, tok, recipe, split: Optional[str] = None) -> dict:
    """`lora-ft eval`: entity metrics of a trained run on a split of any dataset with the recipe's columns."""
    from ..metrics import entity_report

    a = recipe.args
    split = split or a.eval_split or "test"
    where = f"{a.dataset_name} [{split}]"
    ds = take(apply_column_map(load_eval_split(a.dataset_name, split, a.dataset_config), a.column_map, where),
              a.max_eval_samples, recipe.trainer.get("seed", 42))
    notes: list[str] = []
    part = _rows(ds, a, where, a.labels, notes)
    _iob2([part], a, notes)
    names = _names(model, recipe)
    pred = []
    for ws, _, _, lg in _word_logits(model, tok, part[0], a):
        pred.append([names[i] for i in lg.argmax(-1).tolist()] + ["O"] * (len(ws) - lg.shape[0]))
    report = entity_report(part[1], pred)
    return {**_metrics(report), "eval_confusion_matrix": report["confusion_matrix"], "eval_samples": len(pred),
            "dataset": a.dataset_name, "split": split, "notes": notes}


# ---------------------------------------------------------------- merge, export, hub


def verify_inputs(run_dir: Path, n: int):
    return eval_rows(run_dir, "eval_predictions.jsonl", "tokens", "tags", n)


def verify_logits(model, tok, inputs: list, args) -> list:
    """Logits of each word's first subword, exactly what predict decodes."""
    return [lg for _, _, _, lg in _word_logits(model, tok, inputs, args)]


def verify_metric(logits, refs, args):
    if not refs or refs[0] is None:
        return None
    from ..metrics import entity_report

    names = [str(x) for x in args.labels]
    pred = [[names[i] for i in lg.argmax(-1).tolist()] + ["O"] * (len(g) - lg.shape[0]) for lg, g in zip(logits, refs)]
    return "f1", entity_report(refs, pred)["f1"]


def export_check(model, reloaded, tok, texts: list, args) -> tuple[dict, float]:
    a = [lg.argmax(-1) for lg in verify_logits(model, tok, texts, args)]
    b = [lg.argmax(-1) for lg in verify_logits(reloaded, tok, texts, args)]
    total = sum(len(x) for x in a)
    agree = sum(int((x == y).sum()) for x, y in zip(a, b)) / max(total, 1)
    return {"word_tag_agreement": agree}, agree


def card_lines(recipe: dict) -> list[str]:
    labels = recipe.get("labels")
    return ["- **Tags (id order, IOB2):** " + ", ".join(f"`{i}`: {lab}" for i, lab in enumerate(labels))] if labels else []


def usage_snippet(adapter: bool, cls: str, head: list[str], rev: str, recipe: dict, chat: bool) -> str:
    """Words as lora_ft splits them, through is_split_into_words; each word's first subword gives its tag."""
    from ..tags import WORD

    max_length = recipe.get("max_length") or 512
    return "\n".join(["import re"] + head_snippet(head, cls, adapter, rev, recipe) + [
        "model.eval()",
        'text = "Angela Merkel visited Paris ."',
        f"words = re.findall({WORD.pattern!r}, text)",
        "pre = repr(tokenizer.backend_tokenizer.pre_tokenizer)",
        "# byte-level BPE: words after the first carry their leading space, as in running text (lora_ft does the same)",
        'spaced = "ByteLevel(" in pre and "add_prefix_space=False" in pre',
        'pieces = [" " + w if spaced and i else w for i, w in enumerate(words)]',
        f'inputs = tokenizer(pieces, is_split_into_words=True, truncation=True, max_length={max_length}, return_tensors="pt")',
        "with torch.no_grad():",
        "    pred = model(**inputs).logits.argmax(-1)[0].tolist()",
        "seen = set()",
        "for pos, w in enumerate(inputs.word_ids()):",
        "    if w is not None and w not in seen:",
        "        seen.add(w)",
        "        print(words[w], labels[pred[pos]])"])
