"""Task metrics. Pure functions over arrays and strings, no model code."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], label_names: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows: true)."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    ids = list(range(len(label_names)))
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": {"labels": list(label_names), "matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist()},
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ---- text generation metrics (SQuAD v1.1 official normalisation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace: the official SQuAD evaluation rules."""
    import re
    import string

    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(max((normalize_answer(prediction) == normalize_answer(r)) for r in references))


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    from collections import Counter

    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    if same == 0:
        return 0.0
    p, r = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * p * r / (p + r)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    return max(_f1(normalize_answer(prediction).split(), normalize_answer(r).split()) for r in references)


def _rouge_tokens(s: str) -> list[str]:
    """Tokens as rouge_score's default tokenizer makes them (lowercase runs of letters and digits; everything else
    separates), except that non-ASCII letters count as letters, so "Beyoncé" or a Chinese answer is not dropped.
    Splitting on whitespace kept punctuation on words: "Denver." did not match "Denver"."""
    import re

    return re.findall(r"[^\W_]+", s.lower())


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (LCS based) on rouge_score's tokens, best over references."""

    def lcs(a, b):
        prev = [0] * (len(b) + 1)
        for x in a:
            cur = [0]
            for j, y in enumerate(b):
                cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
            prev = cur
        return prev[-1]

    best = 0.0
    p = _rouge_tokens(prediction)
    for ref in references:
        r = _rouge_tokens(ref)
        n = lcs(p, r)
        if n:
            prec, rec = n / len(p), n / len(r)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def qa_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Mean exact match, F1 and ROUGE-L (as percentages for EM/F1, like the official script)."""
    n = max(len(predictions), 1)
    return {
        "exact_match": 100.0 * sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
        "f1": 100.0 * sum(token_f1(p, r) for p, r in zip(predictions, references)) / n,
        "rouge_l": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
    }


def entity_report(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Entity-level micro precision / recall / F1 in strict IOB2 (seqeval's mode="strict": an entity counts only when
    its type and both boundaries match), per entity type, token accuracy, and an entity-type confusion matrix."""
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    kw = dict(mode="strict", scheme=IOB2, zero_division=0)
    per = classification_report(gold, pred, output_dict=True, **kw)
    types = sorted(k for k in per if not k.endswith(" avg"))
    return {
        "precision": float(precision_score(gold, pred, **kw)),
        "recall": float(recall_score(gold, pred, **kw)),
        "f1": float(f1_score(gold, pred, **kw)),
        "token_accuracy": float(accuracy_score(gold, pred)),
        "per_type": {t: {"precision": float(per[t]["precision"]), "recall": float(per[t]["recall"]),
                         "f1": float(per[t]["f1-score"]), "support": int(per[t]["support"])} for t in types},
        "confusion_matrix": entity_confusion(gold, pred, types),
    }


def entity_confusion(gold: list[list[str]], pred: list[list[str]], types: list[str]) -> dict:
    """Rows: the gold type of each span (O: a predicted span with no gold entity there); columns: the type predicted
    on exactly that span (O: missed). Boundary errors count as a miss plus a spurious entity, as strict F1 does."""
    from .tags import spans

    names = list(types) + ["O"]
    index = {n: i for i, n in enumerate(names)}
    m = [[0] * len(names) for _ in names]
    for g, p in zip(gold, pred):
        gs = {(a, b): t for t, a, b in spans(g, strict=True)}
        ps = {(a, b): t for t, a, b in spans(p, strict=True)}
        for span, t in gs.items():
            m[index[t]][index.get(ps.get(span, "O"), index["O"])] += 1
        for span, t in ps.items():
            if span not in gs and t in index:
                m[index["O"]][index[t]] += 1
    return {"labels": names, "matrix": m}
