"""Loading datasets from the Hub or local files into train/eval splits, with clear errors.

Task-specific preparation (label ids, prompts, tokenization) lives in lora_ft.tasks; this module only
finds the rows.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from .errors import DataError

EXTENSIONS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".tsv": "csv", ".conll": "conll",
              ".txt": "conll"}
CONLL_LINE = "_line"  # column of CoNLL-read rows: the file line each sentence starts on, for error messages
# Names a split file may carry in a local folder, by split.
SPLIT_ALIASES = {"test": ("test",), "validation": ("validation", "valid", "val", "dev"), "dev": ("dev", "validation")}
SPLIT_NAMES = {"train", *(n for names in SPLIT_ALIASES.values() for n in names)}


def _split_files(folder: Path) -> dict[str, Path]:
    found = {}
    for p in sorted(folder.iterdir()):
        # .txt is CoNLL data only under a split's name: a folder's README.txt or notes.txt is not a split
        if p.is_file() and p.suffix.lower() in EXTENSIONS and (p.suffix.lower() != ".txt" or p.stem in SPLIT_NAMES):
            found.setdefault(p.stem, p)
    return found


HEAD_BYTES = 1 << 20  # the UTF-8 check reads this much: enough to catch a wrongly encoded export early


def _check_utf8(path: Path) -> None:
    import codecs

    try:
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
            at_end = not fh.read(1)
        # Incremental: a head that ends inside a multi-byte character is valid; the rest of it is past the cut.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=at_end)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None


def _innermost(e: BaseException) -> BaseException:
    """datasets wraps every builder failure in DatasetGenerationError; the parser's own error is at the bottom."""
    seen = {id(e)}
    while (nxt := e.__cause__ or e.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        e = nxt
    return e


def _json_syntax_error(path: Path) -> Optional[str]:
    """'line N: why' for the first line that does not parse (JSON Lines) or the document's error; None if it parses."""
    import json

    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    try:
        json.loads(first)
        jsonl = True
    except json.JSONDecodeError:
        jsonl = False
    if jsonl:
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {n}: {e.msg} at column {e.colno}"
        return None
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return f"line {e.lineno}: {e.msg} at column {e.colno}"
    return None


def _read_file(path: Path, split_label: str):
    import csv

    import datasets

    fmt = EXTENSIONS[path.suffix.lower()]
    if fmt == "conll":
        _check_utf8(path)
        return read_conll(path)
    kwargs = {}
    if path.suffix.lower() == ".tsv":
        # TSV has no quoting: a text that starts with '"' would otherwise swallow the rows up to the next quote.
        kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
    if fmt == "csv":
        kwargs["keep_default_na"] = False  # "None"/"NA" tweets are text, not missing values
    if fmt != "parquet":  # Parquet is binary; its own reader checks it
        _check_utf8(path)
    quiet = logging.getLogger("datasets")  # it logs its own copy of a parse error; ours below is the one line
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        ds = datasets.load_dataset(fmt, data_files={split_label: str(path)}, split=split_label, **kwargs)
    except Exception as e:  # pyarrow/pandas parse errors come in many types
        cause = _innermost(e)
        msg = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        if fmt == "json":
            msg = _json_syntax_error(path) or msg
        raise DataError(f"{path}: cannot parse as {fmt} ({msg}); fix the file or convert it") from None
    finally:
        quiet.setLevel(level)
    return ds


def read_conll(path: Path):
    """CoNLL column format: one token per line, its tag in the last column, blank lines between sentences,
    `-DOCSTART-` lines skipped. Rows: tokens, ner_tags and the line each sentence starts on."""
    import datasets

    tokens, tags, starts = [], [], []
    words: list[str] = []
    labels: list[str] = []
    start = 0
    with open(path, encoding="utf-8") as fh:
        for n, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line or line.startswith("-DOCSTART-"):
                if words:
                    tokens.append(words), tags.append(labels), starts.append(start)
                words, labels = [], []
                continue
            cols = line.split()
            if len(cols) < 2:
                raise DataError(f"{path} line {n}: one column ('{line[:40]}'); CoNLL lines hold the token and its tag "
                                "in the last column, separated by whitespace")
            if not words:
                start = n
            words.append(cols[0])
            labels.append(cols[-1])
    if words:
        tokens.append(words), tags.append(labels), starts.append(start)
    if not tokens:
        raise DataError(f"{path}: no sentences; a CoNLL file holds one 'token ... tag' line per token")
    return datasets.Dataset.from_dict({"tokens": tokens, "ner_tags": tags, CONLL_LINE: starts})


def _find_split(files: dict[str, Path], split: str) -> Optional[Path]:
    for name in SPLIT_ALIASES.get(split, (split,)):
        if name in files:
            return files[name]
    return None


def load_splits(dataset_name: str, train_split: str, eval_split: Optional[str], dataset_config: Optional[str] = None):
    """Return (train, eval_or_None, note). Local folders hold one file per split; a lone file is the train split."""
    path = Path(os.path.expanduser(dataset_name))
    if path.exists():
        if path.is_file():
            if path.suffix.lower() not in EXTENSIONS:
                raise DataError(f"{path}: unsupported file type; use one of {', '.join(EXTENSIONS)}")
            return _read_file(path, "train"), None, f"{path.name} used as the train split"
        files = _split_files(path)
        if not files:
            raise DataError(f"{path}: no data files (.csv, .json, .jsonl, .parquet, .conll) in this folder")
        train_file = _find_split(files, train_split)
        if train_file is None and len(files) == 1:  # one file in a folder: it is the training data
            (only,) = files.values()
            return _read_file(only, "train"), None, f"{only.name} used as the train split"
        if train_file is None:
            raise DataError(f"{path}: no '{train_split}' file (found: {', '.join(files)}); set train_split to one of them")
        train = _read_file(train_file, "train")
        eval_ds = None
        if eval_split:
            eval_file = _find_split(files, eval_split)
            eval_ds = _read_file(eval_file, "eval") if eval_file else None
        return train, eval_ds, None
    if dataset_name.startswith((".", "/", "~")) or os.sep in dataset_name.strip("/").replace("/", "", 1):
        raise DataError(f"dataset_name: {dataset_name} does not exist; check the path (relative paths start from the current directory)")
    return _load_hub(dataset_name, dataset_config, train_split, eval_split)


MIXTURE_KEYS = {"dataset_name", "split", "samples", "fraction", "column_map", "dataset_config"}


def mixture_problems(mix) -> list[str]:
    """Recipe-time checks of dataset_mixture entries (before any data loads)."""
    if not isinstance(mix, list) or not mix:
        return ["dataset_mixture: a list of sources, e.g. [{dataset_name: a.csv, samples: 500}, {dataset_name: b/, fraction: 0.5}]"]
    out = []
    for i, src in enumerate(mix):
        where = f"dataset_mixture[{i}]"
        if not isinstance(src, dict) or not src.get("dataset_name"):
            out.append(f"{where}: needs dataset_name")
            continue
        unknown = set(src) - MIXTURE_KEYS
        if unknown:
            out.append(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(MIXTURE_KEYS))}")
        if "samples" in src and "fraction" in src:
            out.append(f"{where}: give samples or fraction, not both")
        if "samples" in src and not (isinstance(src["samples"], int) and src["samples"] > 0):
            out.append(f"{where}: samples must be a positive integer")
        if "fraction" in src and not (isinstance(src["fraction"], (int, float)) and 0 < src["fraction"] <= 1):
            out.append(f"{where}: fraction must be in (0, 1]")
        if not isinstance(src.get("column_map", {}), dict):
            out.append(f"{where}: column_map must be a mapping")
    return out


def load_task_train(a, seed: int, where: str):
    """The prologue every task's prepare_data shares: (train with the recipe's column_map applied, eval_or_None,
    notes); `where` names the train rows in column_map errors."""
    train, eval_ds, note = load_task_splits(a, seed)
    return apply_column_map(train, a.column_map, where), eval_ds, [note] if note else []


def load_task_splits(a, seed: int):
    """(train, eval_or_None, note) for a recipe: its dataset_name, or a seeded mixture of several sources whose
    eval split (if any) comes from dataset_name."""
    if not a.dataset_mixture:
        return load_splits(a.dataset_name, a.train_split, a.eval_split, a.dataset_config)
    import datasets

    parts, notes = [], []
    for i, src in enumerate(a.dataset_mixture):
        ds = load_splits(src["dataset_name"], src.get("split", "train"), None, src.get("dataset_config"))[0]
        ds = apply_column_map(ds, src.get("column_map") or {}, f"dataset_mixture[{i}]")
        n = src.get("samples") or (max(1, round(src["fraction"] * len(ds))) if "fraction" in src else len(ds))
        if n > len(ds):
            notes.append(f"dataset_mixture[{i}]: asked for {n} rows, {src['dataset_name']} has {len(ds)}; took all")
        ds = take(ds, n, seed + i)
        parts.append(ds)
        notes.append(f"{src['dataset_name']}: {len(ds)} rows")
    common = [c for c in parts[0].column_names if all(c in p.column_names for p in parts)]
    parts = [p.select_columns(common) for p in parts]
    try:
        parts = [p if p.features == parts[0].features else p.cast(parts[0].features) for p in parts]
        train = datasets.concatenate_datasets(parts).shuffle(seed=seed)
    except (ValueError, TypeError) as e:
        raise DataError(f"dataset_mixture: sources do not share column types ({str(e).splitlines()[0][:120]}); map them with column_map") from None
    eval_ds = None
    if a.dataset_name and a.eval_split:
        eval_ds = load_splits(a.dataset_name, a.train_split, a.eval_split, a.dataset_config)[1]
    return train, eval_ds, "mixture: " + "; ".join(notes) + f" (columns kept: {', '.join(common)})"


def load_eval_split(dataset_name: str, split: str, dataset_config: Optional[str] = None):
    """The rows `lora-ft eval` scores. A file is scored whole; a folder or Hub dataset must have `split`
    (never silently fall back to the training file)."""
    path = Path(os.path.expanduser(dataset_name))
    if path.is_file():
        return load_splits(dataset_name, "train", None)[0]
    if path.is_dir():
        files = _split_files(path)
        found = _find_split(files, split)
        if found is None:
            raise DataError(f"{path}: no '{split}' file (found: {', '.join(files) or 'none'}); pass --split NAME or a file path")
        return _read_file(found, "eval")
    return load_splits(dataset_name, split, None, dataset_config)[0]


def _load_hub(name: str, config: Optional[str], train_split: str, eval_split: Optional[str]):
    import datasets

    try:
        dd = datasets.load_dataset(name, config)
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise DataError(
            f"dataset_name: cannot load '{name}' from the Hub ({first}); check the id and your connection, "
            "or pass a local file/folder"
        ) from None
    if train_split not in dd:
        raise DataError(f"dataset_name: '{name}' has no split '{train_split}' (has: {', '.join(dd)}); set train_split")
    eval_ds = None
    if eval_split:
        for cand in SPLIT_ALIASES.get(eval_split, (eval_split,)):
            if cand in dd:
                eval_ds = dd[cand]
                break
    return dd[train_split], eval_ds, None


def check_columns(ds, columns: dict[str, Optional[str]], where: str) -> None:
    """Every recipe key naming a column must name one the data has."""
    have = list(ds.column_names)
    for key, col in columns.items():
        if col is not None and col not in have:
            raise DataError(f"{key}: column '{col}' not in {where} (columns: {', '.join(have)}); set {key} to one of them")


def apply_column_map(ds, column_map: dict[str, str], where: str):
    """Rename the mapped columns that this source has. One recipe then serves sources that name a column
    differently (Hub `label_text`, local `sentiment`); a column still missing afterwards is caught by
    check_columns with the full list of columns."""
    present = {k: v for k, v in (column_map or {}).items() if k in ds.column_names and k != v}
    if not present:
        return ds
    clash = [v for v in present.values() if v in ds.column_names]
    if clash:
        ds = ds.remove_columns(clash)
    return ds.rename_columns(present)


def take(ds, n: Optional[int], seed: int):
    """A seeded random subset of at most n rows (all rows when n is None)."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def split_off_eval(train, eval_size: float, seed: int, stratify_by: Optional[str] = None):
    try:
        parts = train.train_test_split(test_size=eval_size, seed=seed, stratify_by_column=stratify_by)
    except (ValueError, TypeError):  # too few rows per class to stratify, or a non-ClassLabel column
        parts = train.train_test_split(test_size=eval_size, seed=seed)
    return parts["train"], parts["test"]
