"""Loading datasets from the Hub or local files into train/eval splits, with clear errors.

Task-specific preparation (label ids, prompts, tokenization) lives in lora_ft.tasks; this module only
finds the rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .errors import DataError

EXTENSIONS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".tsv": "csv"}
# Names a split file may carry in a local folder, by split.
SPLIT_ALIASES = {"test": ("test",), "validation": ("validation", "valid", "val", "dev"), "dev": ("dev", "validation")}


def _split_files(folder: Path) -> dict[str, Path]:
    found = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in EXTENSIONS:
            found.setdefault(p.stem, p)
    return found


def _read_file(path: Path, split_label: str):
    import datasets

    fmt = EXTENSIONS[path.suffix.lower()]
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    if fmt == "csv":
        kwargs["keep_default_na"] = False  # "None"/"NA" tweets are text, not missing values
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 20)
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    try:
        ds = datasets.load_dataset(fmt, data_files={split_label: str(path)}, split=split_label, **kwargs)
    except Exception as e:  # pyarrow/pandas parse errors come in many types
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot parse as {fmt} ({msg}); fix the file or convert it") from None
    return ds


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
            raise DataError(f"{path}: no data files (.csv, .json, .jsonl, .parquet) in this folder")
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
