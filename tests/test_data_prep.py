"""Data preparation: `lora-ft data inspect` on a fixture with known counts, cleaning (same at train and serve time),
duplicate/leak filters, EDA augmentation with embedding synonyms, and dataset mixtures."""

from __future__ import annotations

import json
import random

import pytest

from conftest import LABELS, SHARED_DATA, cls_recipe, read_rows, train_in_process, write_csv
from lora_ft.cli import main
from lora_ft.config import resolve
from lora_ft.errors import RecipeError
from lora_ft.textprep import augment_rows, augment_text, clean_text, parse_augment

BASE = {"model_name_or_path": "m", "dataset_name": "d"}


@pytest.fixture()
def known(tmp_path):
    """train: 10 rows (1 empty, 2 repeats of one text, 1 repeat of another); test: 4 rows, 2 of them in train."""
    train = [{"text": t, "label": l} for t, l in [
        ("good day", "positive"), ("good day", "positive"), ("good day", "positive"), ("bad day", "negative"),
        ("bad day", "negative"), ("a table", "neutral"), ("", "neutral"), ("lovely weather today", "positive"),
        ("the bus is late again and again", "negative"), ("ok", "neutral")]]
    test = [{"text": t, "label": l} for t, l in [("good day", "positive"), ("ok", "neutral"), ("new text", "neutral"), ("meh", "negative")]]
    write_csv(tmp_path / "d" / "train.csv", train)
    write_csv(tmp_path / "d" / "test.csv", test)
    return tmp_path / "d"


def test_inspect_counts(known, tiny_gpt2, tmp_path, capsys):
    capsys.readouterr()
    hist = tmp_path / "h.png"
    assert main(["data", "inspect", str(known), "--model_name_or_path", str(tiny_gpt2), "--json", "--histogram", str(hist)]) == 0
    r = json.loads(capsys.readouterr().out)
    tr, te = r["splits"]["train"], r["splits"]["test"]
    assert (tr["rows"], tr["empty_rows"], tr["duplicate_rows"]) == (10, 1, 3)
    assert tr["labels"] == {"negative": 3, "neutral": 3, "positive": 4}
    assert (te["rows"], te["rows_also_in_train"]) == (4, 2)
    t = r["tokens"]
    assert t["p50"] <= t["p90"] <= t["p99"] <= t["max"] and t["suggested_max_length"] >= t["p99"] and t["suggested_max_length"] % 8 == 0
    assert hist.is_file() and hist.stat().st_size > 1000
    # its own PNG is replaced on a re-run; someone else's file in its place is not (see test_cli's refusals)
    assert main(["data", "inspect", str(known), "--model_name_or_path", str(tiny_gpt2), "--json", "--histogram", str(hist)]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(known)]) == 0  # the table form
    assert "max_length" not in capsys.readouterr().out  # no tokenizer, no token figures


@pytest.mark.skipif(not (SHARED_DATA / "tweet_sentiment").is_dir(), reason="shared data not mounted")
def test_inspect_real_tweets(capsys):
    from conftest import REPO

    assert main(["data", "inspect", str(REPO.parent / "shared/data/tweet_sentiment"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["splits"]["train"]["rows"] == 27481 and r["splits"]["test"]["rows"] == 3534 and r["label_column"] == "sentiment"


def test_clean_text():
    class A:
        clean_lowercase = clean_urls = clean_mentions = clean_whitespace = True

    assert clean_text("Hi  @bob see https://x.co/a?b=1 NOW", A()) == "hi see now"
    off = type("Off", (), {k: False for k in ("clean_lowercase", "clean_urls", "clean_mentions", "clean_whitespace")})()
    assert clean_text("Hi  @bob", off) == "Hi  @bob"


def test_cleaning_applies_at_serving_time_too(tmp_path, tiny_gpt2, tiny_data, capsys):
    recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, tiny_data, max_steps=2, clean_lowercase=True, clean_urls=True,
                        clean_mentions=True, clean_whitespace=True)
    run_dir = train_in_process(recipe, tmp_path / "run")
    capsys.readouterr()
    assert main(["predict", str(run_dir), "--text", "What A GREAT day @someone https://t.co/xyz", "--text", "what a great day"]) == 0
    a, b = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert a["scores"] == b["scores"] and a["text"] != b["text"]


def test_duplicate_and_leak_filters(known, tiny_gpt2, tmp_path):
    recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, known, max_steps=1, drop_duplicates=True, drop_eval_leaks=True, labels=LABELS)
    run_dir = train_in_process(recipe, tmp_path / "run")
    notes = json.loads((run_dir / "metrics.json").read_text())["data_notes"]
    assert "drop_duplicates: dropped 3 repeated train row(s)" in notes
    assert "drop_eval_leaks: dropped 2 train row(s) whose text is in the eval split" in notes  # "good day" and "ok"
    assert json.loads((run_dir / "metrics.json").read_text())["train_examples"] == 10 - 1 - 3 - 2


def test_augment_parsing_and_determinism():
    assert parse_augment("synonym:0.1,swap:0.2") == {"synonym": 0.1, "swap": 0.2}
    for bad in ("shuffle:0.1", "swap", "swap:2"):
        with pytest.raises(RecipeError, match="augment"):
            parse_augment(bad)
    with pytest.raises(RecipeError, match="sequence-classification"):
        resolve({**BASE, "task": "causal-lm", "augment": "swap:0.1"})
    texts = ["the quick brown fox jumps over the lazy dog", "one two three four five six"]
    a = augment_rows(texts, {"swap": 0.2, "delete": 0.2}, copies=3, seed=7)
    assert a == augment_rows(texts, {"swap": 0.2, "delete": 0.2}, copies=3, seed=7)
    assert a != augment_rows(texts, {"swap": 0.2, "delete": 0.2}, copies=3, seed=8)
    assert all(set(v.split()) <= set(texts[i].split()) for i, v in a)  # swap/delete add no words
    assert augment_text("single", {"swap": 1.0}, random.Random(0)) == "single"


def test_embedding_synonyms_from_the_builtin_encoder():
    from transformers import AutoTokenizer

    from lora_ft.builtin_models import resolve_model_path
    from lora_ft.textprep import EmbeddingSynonyms, load_input_embeddings

    path = resolve_model_path("builtin:minilm-l6")
    syn = EmbeddingSynonyms(AutoTokenizer.from_pretrained(path), load_input_embeddings(path))
    assert syn("movie") == "film" and syn("terrible") == "horrible" and syn("Tired") == "Exhausted"
    assert syn("qzxv") is None


def test_augmented_training_adds_rows(tmp_path, tiny_gpt2, tiny_data):
    recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, tiny_data, max_steps=1, augment="swap:0.2,delete:0.1", augment_copies=2,
                        eval_split="none")
    m = json.loads((train_in_process(recipe, tmp_path / "run") / "metrics.json").read_text())
    n = len(read_rows(tiny_data / "train.csv"))
    assert n < m["train_examples"] <= 3 * n
    assert any(note.startswith("augment swap:0.2,delete:0.1 x2: +") for note in m["data_notes"])


def test_dataset_mixture(tmp_path, tiny_gpt2, tiny_data):
    rows = read_rows(tiny_data / "train.csv")
    write_csv(tmp_path / "a.csv", rows[:60])
    write_csv(tmp_path / "b.csv", [{"sentence": r["text"], "sentiment": r["label"], "extra": "x"} for r in rows[60:]])
    mix = [{"dataset_name": str(tmp_path / "a.csv"), "samples": 20},
           {"dataset_name": str(tmp_path / "b.csv"), "fraction": 0.5, "column_map": {"sentence": "text", "sentiment": "label"}}]
    recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, tiny_data, max_steps=1, dataset_mixture=mix)
    m = json.loads((train_in_process(recipe, tmp_path / "run") / "metrics.json").read_text())
    assert m["train_examples"] == 20 + 30 and m["eval_samples"] == len(read_rows(tiny_data / "test.csv"))
    note = next(n for n in m["data_notes"] if n.startswith("mixture:"))
    assert "a.csv: 20 rows" in note and "b.csv: 30 rows" in note and "columns kept: text, label" in note
    for bad, culprit in [([{"samples": 3}], "needs dataset_name"), ([{"dataset_name": "x", "samples": 1, "fraction": 0.5}], "not both"),
                         ([{"dataset_name": "x", "weight": 2}], "unknown key"), ([], "a list")]:
        with pytest.raises(RecipeError, match=culprit):
            resolve({**BASE, "dataset_mixture": bad})
