"""The trainer-argument keys a recipe may set, known without importing transformers.

Importing transformers (and through it torch) takes 5-13 s on a 2-core CPU, and a misspelled key should be reported
long before that. So the field names and annotations of the trainer-argument classes are kept in
`trainer_keys.json`, written from the installed libraries by `python -m lora_ft.trainer_keys`. Where the installed
transformers or trl is not the version the file was written from, the fields are read from the classes themselves
(slower, always right); `tests/test_config.py` fails when the file and the pinned libraries disagree.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import typing
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Union

SNAPSHOT = Path(__file__).with_name("trainer_keys.json")
# The class a recipe for each kind of trainer may also set: "module:ClassName".
CLASSES = {
    "training": "transformers:TrainingArguments",
    "seq2seq_training": "transformers:Seq2SeqTrainingArguments",
    "sft": "trl:SFTConfig",
    # preference tuning: one kind per trl trainer (trl 1.16 keeps ORPO and CPO under trl.experimental)
    "dpo": "trl:DPOConfig",
    "orpo": "trl.experimental.orpo:ORPOConfig",
    "cpo": "trl.experimental.cpo:CPOConfig",
    "kto": "trl:KTOConfig",
}
LIBRARIES = ("transformers", "trl")


def import_class(kind: str):
    import importlib
    import warnings

    module, name = CLASSES[kind].split(":")
    with warnings.catch_warnings():  # trl.experimental warns at import that its API may change: trl is pinned
        warnings.simplefilter("ignore")
        return getattr(importlib.import_module(module), name)


@functools.lru_cache(maxsize=None)
def trainer_fields(kind: str) -> dict[str, Any]:
    """{field name: annotation} of the trainer-arguments class `kind`, from the snapshot when it matches the installed
    libraries, else from the class itself."""
    snap = _snapshot()
    if snap is not None and snap["versions"] == installed_versions():
        return {name: decode(spec) for name, spec in snap["classes"][kind].items()}
    cls = import_class(kind)
    hints = typing.get_type_hints(cls)
    # through the JSON form too, so both ways check alike (an enum's choices, not any string)
    return {f.name: decode(encode(hints.get(f.name, Any))) for f in dataclasses.fields(cls) if f.init}


def installed_versions() -> dict[str, str | None]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


@functools.lru_cache(maxsize=None)
def _snapshot() -> dict | None:
    try:
        return json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- annotations <-> JSON

_SIMPLE = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict", type(None): "none"}
_SIMPLE_BACK = {v: k for k, v in _SIMPLE.items()}


def encode(tp) -> Any:
    """A JSON form of an annotation, keeping what config.coerce checks: the simple types, unions, literals and the
    values of enums. An enum that sits in a union with str (transformers' `IntervalStrategy | str`) is kept as the
    enum: the str only lets callers pass the value by name, and any other string is rejected by the class."""
    if tp in _SIMPLE:
        return _SIMPLE[tp]
    origin = typing.get_origin(tp)
    if origin in (list, dict):
        return _SIMPLE[origin]
    if origin is Literal:
        return {"literal": list(typing.get_args(tp))}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [e.value for e in tp]}
    if origin is Union or type(tp).__name__ == "UnionType":
        members = typing.get_args(tp)
        enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
        if enums and str in members:
            members = tuple(m for m in members if m is not str)
        return {"union": [encode(m) for m in members]}
    return "any"  # exotic classes (ParallelismConfig, GenerationConfig): the class's own __post_init__ checks them


def decode(spec) -> Any:
    if isinstance(spec, str):
        return Any if spec == "any" else _SIMPLE_BACK[spec]
    if "literal" in spec:
        return Literal[tuple(spec["literal"])]
    if "enum" in spec:
        return _enum(tuple(spec["enum"]))
    return Union[tuple(decode(m) for m in spec["union"])]


@functools.lru_cache(maxsize=None)
def _enum(values: tuple):
    return enum.Enum("Choices", [(str(v), v) for v in values])


def build_snapshot() -> dict:
    classes = {}
    for kind in CLASSES:
        cls = import_class(kind)
        hints = typing.get_type_hints(cls)
        classes[kind] = {f.name: encode(hints.get(f.name, Any)) for f in dataclasses.fields(cls) if f.init}
    return {"versions": installed_versions(), "classes": classes}


def main() -> None:
    SNAPSHOT.write_text(json.dumps(build_snapshot(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {SNAPSHOT} for {installed_versions()}")


if __name__ == "__main__":
    main()
