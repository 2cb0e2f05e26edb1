"""`lora-ft data inspect`: what a dataset holds before anyone trains on it.

Rows per split, label distribution, empty and duplicate rows, rows shared by train and eval/test (leaks),
token-length percentiles for a tokenizer with a histogram PNG, and the max_length that keeps 99% of rows whole.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Optional

from .data import _read_file, _split_files, apply_column_map, load_splits
from .errors import DataError
from .outputs import PNG_METADATA, check_output, output_file, png_by_lora_ft

TEXT_GUESSES = ("text", "sentence", "review", "content", "prompt", "question", "instruction")
LABEL_GUESSES = ("label", "labels", "sentiment", "label_text", "category", "class")


def _splits(dataset: str) -> dict:
    p = Path(dataset)
    if p.is_dir():
        files = _split_files(p)
        if not files:
            raise DataError(f"{p}: no data files (.csv, .json, .jsonl, .parquet) in this folder")
        return {name: _read_file(f, name) for name, f in files.items()}
    train, eval_ds, _ = load_splits(dataset, "train", "test")
    return {"train": train, **({"test": eval_ds} if eval_ds is not None else {})}


def _guess(columns: list[str], guesses: tuple[str, ...]) -> Optional[str]:
    return next((c for c in guesses if c in columns), None)


def percentile(sorted_vals: list[int], q: float) -> int:
    if not sorted_vals:
        return 0
    return sorted_vals[min(len(sorted_vals) - 1, max(0, math.ceil(q / 100 * len(sorted_vals)) - 1))]


def inspect(dataset: str, text_column: Optional[str] = None, label_column: Optional[str] = None,
            column_map: Optional[dict] = None, tokenizer=None, histogram: Optional[Path] = None, overwrite: bool = False) -> dict:
    if histogram is not None:  # before any reading: a refused output costs nothing
        check_output(Path(histogram), png_by_lora_ft, sources=[Path(dataset)], overwrite=overwrite,
                     what="data inspect: --histogram", folder=False)
    splits = {k: apply_column_map(v, column_map or {}, k) for k, v in _splits(dataset).items()}
    first = next(iter(splits.values()))
    text_column = text_column or _guess(first.column_names, TEXT_GUESSES)
    if text_column is None or text_column not in first.column_names:
        raise DataError(f"--text_column: '{text_column}' not found (columns: {', '.join(first.column_names)}); pass --text_column")
    label_column = label_column or _guess(first.column_names, LABEL_GUESSES)
    report: dict = {"dataset": dataset, "text_column": text_column, "label_column": label_column, "splits": {}}
    texts_by_split = {}
    for name, ds in splits.items():
        texts = ["" if t is None else str(t) for t in ds[text_column]] if text_column in ds.column_names else []
        texts_by_split[name] = texts
        counts = Counter(t.strip() for t in texts if t.strip())
        info = {"rows": len(ds), "columns": ds.column_names, "empty_rows": sum(1 for t in texts if not t.strip()),
                "duplicate_rows": sum(c - 1 for c in counts.values() if c > 1)}
        if label_column and label_column in ds.column_names:
            info["labels"] = dict(sorted(Counter(str(v) for v in ds[label_column]).items()))
        report["splits"][name] = info
    train_name = "train" if "train" in texts_by_split else next(iter(texts_by_split))
    train_set = {t.strip() for t in texts_by_split[train_name] if t.strip()}
    for name, texts in texts_by_split.items():
        if name != train_name:
            report["splits"][name]["rows_also_in_" + train_name] = sum(1 for t in {x.strip() for x in texts if x.strip()} if t in train_set)
    if tokenizer is not None:
        lengths = sorted(len(ids) for ids in tokenizer(texts_by_split[train_name], add_special_tokens=True)["input_ids"])
        report["tokens"] = {"split": train_name, **{f"p{q}": percentile(lengths, q) for q in (50, 90, 95, 99)},
                            "max": lengths[-1] if lengths else 0, "suggested_max_length": _round_up(percentile(lengths, 99))}
        if histogram is not None and lengths:
            with output_file(histogram, png_by_lora_ft, sources=[Path(dataset)], overwrite=overwrite, what="data inspect: --histogram") as tmp:
                _plot_lengths(lengths, report["tokens"]["suggested_max_length"], tmp)
            report["tokens"]["histogram"] = str(histogram)
    return report


def _round_up(n: int, to: int = 8) -> int:
    return max(to, -(-n // to) * to)


def _plot_lengths(lengths: list[int], cut: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=min(60, max(10, len(set(lengths)))), color="#1f77b4")
    ax.axvline(cut, color="#d62728", linestyle="--", label=f"max_length {cut} keeps 99% whole")
    ax.set(xlabel="tokens per row", ylabel="rows", title="Token lengths (train)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png", metadata=PNG_METADATA)
    plt.close(fig)


def table(report: dict) -> str:
    lines = [f"{report['dataset']}  (text: {report['text_column']}, label: {report['label_column'] or '-'})", ""]
    lines.append(f"{'split':12s} {'rows':>7s} {'empty':>6s} {'dupes':>6s} {'leak':>6s}  labels")
    for name, s in report["splits"].items():
        leak = next((v for k, v in s.items() if k.startswith("rows_also_in_")), "-")
        labels = ", ".join(f"{k} {v}" for k, v in s.get("labels", {}).items()) or "-"
        lines.append(f"{name:12s} {s['rows']:7d} {s['empty_rows']:6d} {s['duplicate_rows']:6d} {str(leak):>6s}  {labels}")
    t = report.get("tokens")
    if t:
        lines += ["", f"tokens per row ({t['split']}): p50 {t['p50']}  p90 {t['p90']}  p95 {t['p95']}  p99 {t['p99']}  max {t['max']}",
                  f"max_length {t['suggested_max_length']} keeps 99% of rows whole" + (f"; histogram: {t['histogram']}" if t.get("histogram") else "")]
    return "\n".join(lines)

