"""Finding rows (lora_ft.data) and turning them into labeled, tokenized examples (tasks.classification)."""

from __future__ import annotations

import pytest

from conftest import LABELS, QUICKSTART, SHARED_DATA, read_rows, write_csv, write_jsonl
from lora_ft.config import resolve
from lora_ft.data import load_splits
from lora_ft.errors import DataError
from lora_ft.tasks.classification import prepare_data


@pytest.fixture(scope="module")
def tok(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def prepare(tok, **keys):
    recipe = resolve({"model_name_or_path": "unused", "max_length": 32, **keys})
    return prepare_data(recipe, tok)


def rows(n, start=0):
    return read_rows(QUICKSTART / "train.csv")[start:start + n]


# ---------------------------------------------------------------- locations


def test_folder_with_split_files(tiny_data):
    train, eval_ds, note = load_splits(str(tiny_data), "train", "test")
    assert (len(train), len(eval_ds)) == (120, 40)
    assert note is None
    assert train.column_names == ["text", "label"]


def test_split_aliases_in_a_folder(tmp_path):
    write_csv(tmp_path / "train.csv", rows(10))
    write_csv(tmp_path / "dev.csv", rows(5, 10))
    train, eval_ds, _ = load_splits(str(tmp_path), "train", "validation")
    assert (len(train), len(eval_ds)) == (10, 5)


def test_folder_without_the_train_split(tmp_path):
    write_csv(tmp_path / "a.csv", rows(3))
    write_csv(tmp_path / "b.csv", rows(3))
    with pytest.raises(DataError, match="no 'train' file"):
        load_splits(str(tmp_path), "train", "test")


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as exc:
        load_splits(str(missing), "train", "test")
    assert str(missing) in str(exc.value)


def test_lone_csv_gets_a_seeded_eval_split(tmp_path, tok):
    path = write_csv(tmp_path / "all.csv", rows(40))
    d1 = prepare(tok, dataset_name=str(path), eval_size=0.25)
    d2 = prepare(tok, dataset_name=str(path), eval_size=0.25)
    d3 = prepare(tok, dataset_name=str(path), eval_size=0.25, seed=7)
    assert (len(d1.train), len(d1.eval)) == (30, 10)
    assert d1.eval_texts == d2.eval_texts  # same seed, same held-out rows
    assert d1.eval_texts != d3.eval_texts
    assert set(d1.eval_texts) <= {r["text"] for r in rows(40)} and len(set(d1.eval_texts)) == 10
    assert any("held out 10" in n for n in d1.notes)


def test_lone_jsonl_file(tmp_path, tok):
    path = write_jsonl(tmp_path / "data.jsonl", rows(20))
    d = prepare(tok, dataset_name=str(path), eval_split="none")
    assert d.eval is None and len(d.train) == 20
    assert d.label_names == sorted({r["label"] for r in rows(20)})


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_splits(str(path), "train", None)


def test_non_utf8_csv_is_named(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\xe9 au lait,positive\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as exc:
        load_splits(str(path), "train", None)
    assert "latin1.csv" in str(exc.value)


def test_parquet_file_loads(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = rows(12)
    pq.write_table(pa.table({"text": [r["text"] for r in data], "label": [r["label"] for r in data]}), tmp_path / "train.parquet")
    d = prepare(tok, dataset_name=str(tmp_path / "train.parquet"), eval_split="none")
    assert len(d.train) == 12 and d.label_names == sorted({r["label"] for r in data})


def test_utf8_check_accepts_a_character_cut_at_the_first_mib(tmp_path):
    from lora_ft.data import HEAD_BYTES

    path = tmp_path / "train.csv"
    text = "é" * (HEAD_BYTES // 2 + 8)  # 2-byte characters from offset 11: the check's last byte is a first half
    body = ("text,label\n" + text + ",positive\n").encode("utf-8")
    assert (HEAD_BYTES - 11) % 2 == 1
    path.write_bytes(body)
    assert load_splits(str(path), "train", None)[0]["label"] == ["positive"]
    path.write_bytes("text,label\ncafé".encode("utf-8")[:-1])  # a file that really ends inside a character
    with pytest.raises(DataError, match="not UTF-8"):
        load_splits(str(path), "train", None)


def test_tsv_quotes_are_text(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('text\tlabel\n"quoted start\tpositive\nplain\tnegative\nends with a quote"\tneutral\n', encoding="utf-8")
    ds = load_splits(str(path), "train", None)[0]
    assert ds["text"] == ['"quoted start', "plain", 'ends with a quote"']
    assert ds["label"] == ["positive", "negative", "neutral"]


@pytest.mark.parametrize("name, body, where", [
    ("train.csv", "text,label\nok,positive\nbad,row,extra\nfine,negative\n", "line 3"),
    ("train.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n{"text": "c", "label": "y"}\n', "line 2"),
    ("train.json", '[{"text": "a", "label": "x"},\n {"text": "b" "label": "y"}]', "line 2"),
])
def test_parse_error_names_file_and_line(tmp_path, name, body, where):
    (tmp_path / name).write_text(body, encoding="utf-8")
    with pytest.raises(DataError) as exc:
        load_splits(str(tmp_path / name), "train", None)
    msg = str(exc.value)
    assert name in msg and where in msg and "\n" not in msg, msg


# ---------------------------------------------------------------- labels


def test_string_labels_sorted_by_default(tiny_data, tok):
    d = prepare(tok, dataset_name=str(tiny_data))
    assert d.label_names == LABELS  # sorted
    ids = d.train["labels"]
    texts = [r["label"] for r in read_rows(tiny_data / "train.csv")]
    assert [d.label_names[i] for i in ids] == texts  # ids follow the names, row for row


def test_label_order_from_recipe(tiny_data, tok):
    order = ["positive", "negative", "neutral"]
    d = prepare(tok, dataset_name=str(tiny_data), labels=order)
    assert d.label_names == order
    texts = [r["label"] for r in read_rows(tiny_data / "test.csv")]
    assert [order[i] for i in d.eval["labels"]] == texts


def test_int_labels(tmp_path, tok):
    data = [{"text": r["text"], "label": i % 3} for i, r in enumerate(rows(12))]
    write_csv(tmp_path / "train.csv", data)
    d = prepare(tok, dataset_name=str(tmp_path), eval_split="none")
    assert d.label_names == ["0", "1", "2"]
    assert d.train["labels"] == [i % 3 for i in range(12)]
    named = prepare(tok, dataset_name=str(tmp_path), eval_split="none", labels=["neg", "neu", "pos"])
    assert named.label_names == ["neg", "neu", "pos"] and named.train["labels"] == [i % 3 for i in range(12)]


def test_int_labels_sort_numerically(tmp_path, tok):
    write_csv(tmp_path / "train.csv", [{"text": f"row {i}", "label": v} for i, v in enumerate([10, 2, 1, 2, 10])])
    assert prepare(tok, dataset_name=str(tmp_path), eval_split="none").label_names == ["1", "2", "10"]


def test_label_outside_the_set_is_named(tiny_data, tok):
    with pytest.raises(DataError) as exc:
        prepare(tok, dataset_name=str(tiny_data), labels=["negative", "positive"])
    msg = str(exc.value)
    assert "neutral" in msg and "label" in msg and "[negative, positive]" in msg


def test_int_label_outside_the_set(tmp_path, tok):
    write_csv(tmp_path / "train.csv", [{"text": f"row {i}", "label": v} for i, v in enumerate([0, 1, 5, 1])])
    with pytest.raises(DataError, match="5"):
        prepare(tok, dataset_name=str(tmp_path), eval_split="none", labels=["neg", "pos"])


def test_number_names_are_never_positions(tmp_path, tok):
    """labels: [1..5] with data 0..4 used to train 1..4 as names and 0 as position 0 (the name "1")."""
    write_csv(tmp_path / "train.csv", [{"text": f"row {i}", "label": i % 5} for i in range(10)])
    with pytest.raises(DataError, match="label.*0 not in labels \\[1, 2, 3, 4, 5\\].*never as positions"):
        prepare(tok, dataset_name=str(tmp_path), eval_split="none", labels=[1, 2, 3, 4, 5])
    d = prepare(tok, dataset_name=str(tmp_path), eval_split="none", labels=[4, 3, 2, 1, 0])  # names, in this order
    assert [d.label_names[i] for i in d.train["labels"]] == [str(i % 5) for i in range(10)]


def test_eval_label_unseen_in_train(tmp_path, tok):
    write_csv(tmp_path / "train.csv", [r for r in rows(60) if r["label"] != "neutral"])
    write_csv(tmp_path / "test.csv", rows(10, 60))
    with pytest.raises(DataError, match="neutral") as exc:
        prepare(tok, dataset_name=str(tmp_path))
    assert "test" in str(exc.value)  # which split holds it


# ---------------------------------------------------------------- rows and columns


def test_empty_rows_dropped_and_counted(tmp_path, tok):
    data = rows(12)
    data[3]["text"] = ""
    data[5]["text"] = "   "
    data[7]["label"] = ""
    write_csv(tmp_path / "train.csv", data)
    d = prepare(tok, dataset_name=str(tmp_path), eval_split="none")
    assert len(d.train) == 9
    assert any("dropped 3 empty row(s)" in n for n in d.notes), d.notes


def test_na_like_text_is_kept(tmp_path, tok):
    write_csv(tmp_path / "train.csv", [{"text": "None", "label": "a"}, {"text": "NA", "label": "b"}])
    d = prepare(tok, dataset_name=str(tmp_path), eval_split="none")
    assert len(d.train) == 2


def test_only_empty_rows_is_an_error(tmp_path, tok):
    write_csv(tmp_path / "train.csv", [{"text": "", "label": "a"}, {"text": " ", "label": "b"}])
    with pytest.raises(DataError, match="no rows left"):
        prepare(tok, dataset_name=str(tmp_path), eval_split="none")


def test_missing_column_names_it_and_lists_columns(tiny_data, tok):
    with pytest.raises(DataError) as exc:
        prepare(tok, dataset_name=str(tiny_data), text_column="sentence")
    msg = str(exc.value)
    assert msg.startswith("text_column: column 'sentence'") and "columns: text, label" in msg


def test_column_map_renames(tmp_path, tok):
    data = [{"sentence": r["text"], "sentiment": r["label"]} for r in rows(30)]
    write_csv(tmp_path / "train.csv", data[:20])
    write_csv(tmp_path / "test.csv", data[20:])
    d = prepare(tok, dataset_name=str(tmp_path), column_map={"sentence": "text", "sentiment": "label"})
    assert (len(d.train), len(d.eval)) == (20, 10)
    assert d.eval_texts == [r["sentence"] for r in data[20:]]


def test_max_train_and_eval_samples(tiny_data, tok):
    d = prepare(tok, dataset_name=str(tiny_data), max_train_samples=16, max_eval_samples=8)
    assert (len(d.train), len(d.eval)) == (16, 8)
    again = prepare(tok, dataset_name=str(tiny_data), max_train_samples=16, max_eval_samples=8)
    assert d.train["input_ids"] == again.train["input_ids"]  # seeded


def test_tokenized_for_the_model(tiny_data, tok):
    d = prepare(tok, dataset_name=str(tiny_data), max_length=8)
    assert set(d.train.column_names) >= {"input_ids", "attention_mask", "labels"}
    assert "text" not in d.train.column_names
    assert max(len(x) for x in d.train["input_ids"]) == 8
    assert d.train_tokens == sum(len(x) for x in d.train["input_ids"])


def test_text_pair_column(tmp_path, tok):
    data = [{"a": r["text"], "b": "second part", "label": r["label"]} for r in rows(6)]
    write_csv(tmp_path / "train.csv", data)
    d = prepare(tok, dataset_name=str(tmp_path), text_column="a", text_pair_column="b", eval_split="none")
    sep = tok.sep_token_id
    assert all(list(x).count(sep) == 2 for x in d.train["input_ids"])


@pytest.mark.skipif(not (SHARED_DATA / "tweet_sentiment").is_dir(), reason="shared data not mounted")
def test_real_tweets_with_column_map(tok):
    """The shared Kaggle CSVs call the label `sentiment` and have one empty text: the shipped recipe's mapping works."""
    d = prepare(tok, dataset_name=str(SHARED_DATA / "tweet_sentiment"), label_column="label_text",
                column_map={"sentiment": "label_text"}, labels=LABELS, max_train_samples=64, max_eval_samples=32)
    assert d.label_names == LABELS and (len(d.train), len(d.eval)) == (64, 32)
    assert any("dropped 1 empty row(s)" in n for n in d.notes)
