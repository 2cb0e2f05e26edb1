"""Offline fixtures for token classification: a small synthetic NER corpus (IOB2) as JSONL and CoNLL files, and a
tiny trained BERT run on it. The sentences are templates over a few names, so a few dozen steps learn them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import FAST, train_in_process, write_recipe

PEOPLE = [["Angela", "Merkel"], ["John", "Smith"], ["Maria"], ["Peter", "Jones"], ["Anna", "Berg"]]
PLACES = [["Paris"], ["Berlin"], ["New", "York"], ["London"], ["Rome"]]
ORGS = [["Siemens"], ["United", "Nations"], ["Reuters"], ["Acme", "Corp"]]
TEMPLATES = [("PER", "visited", "LOC"), ("PER", "works", "for", "ORG"), ("ORG", "opened", "an", "office", "in", "LOC"),
             ("PER", "met", "PER", "in", "LOC"), ("the", "weather", "in", "LOC", "was", "fine")]
NER_FAST = {**FAST, "max_steps": 30, "learning_rate": 1e-2, "lora_r": 8, "lora_alpha": 16, "max_length": 32}


def sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    words, tags = [], []
    for part in rng.choice(TEMPLATES):
        pool = {"PER": PEOPLE, "LOC": PLACES, "ORG": ORGS}.get(part)
        if pool is None:
            words.append(part), tags.append("O")
            continue
        name = rng.choice(pool)
        words += name
        tags += [f"B-{part}"] + [f"I-{part}"] * (len(name) - 1)
    return words + ["."], tags + ["O"]


def corpus(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [dict(zip(("tokens", "ner_tags"), sentence(rng))) for _ in range(n)]


def write_ner_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_conll(path: Path, rows: list[dict], docstart: bool = True) -> Path:
    lines = ["-DOCSTART- -X- O O", ""] if docstart else []
    for r in rows:
        lines += [f"{w} NNP {t}" for w, t in zip(r["tokens"], r["ner_tags"])] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def ner_recipe(path: Path, model: Path, data: Path, **extra) -> Path:
    keys = {"model_name_or_path": str(model), "task": "token-classification", "dataset_name": str(data), **NER_FAST, **extra}
    return write_recipe(path, **keys)


@pytest.fixture(scope="session")
def ner_data(tmp_path_factory) -> Path:
    """train.jsonl (160 sentences) and test.jsonl (40)."""
    out = tmp_path_factory.mktemp("ner-data")
    write_ner_jsonl(out / "train.jsonl", corpus(160, 0))
    write_ner_jsonl(out / "test.jsonl", corpus(40, 1))
    return out


@pytest.fixture(scope="session")
def ner_run(tmp_path_factory, tiny_bert, ner_data) -> Path:
    root = tmp_path_factory.mktemp("ner-run")
    return train_in_process(ner_recipe(root / "ner.yaml", tiny_bert, ner_data), root / "run")
