"""task: token-classification (NER): data formats and tag schemes, subword alignment, seqeval metrics, and one tiny
trained Llama run taken through eval, predict, serve, merge, ONNX, bnb4, push, doctor and a plain peft reload."""

from __future__ import annotations

import json
import re

import pytest

from conftest import json_lines, run_cli, write_recipe
from fixtures_ner import NER_FAST, corpus, ner_data, ner_recipe, write_conll, write_ner_jsonl  # noqa: F401
from lora_ft.cli import main
from lora_ft.config import resolve
from lora_ft.errors import DataError, RecipeError
from lora_ft.metrics import entity_report
from lora_ft.tags import detect_scheme, spans, split_words, to_iob2


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def recipe_for(model, data, **extra):
    return resolve({"model_name_or_path": str(model), "task": "token-classification", "dataset_name": str(data),
                    **NER_FAST, **extra})


def prepare(model, data, **extra):
    from lora_ft.modeling import load_tokenizer
    from lora_ft.tasks import token_classification as tc

    r = recipe_for(model, data, **extra)
    tok = load_tokenizer(r.args)
    return tc.prepare_data(r, tok), tok


@pytest.fixture(scope="module")
def ner_llama(tmp_path_factory, tiny_llama, ner_data):  # noqa: F811
    """Tiny Llama (a decoder: no pad token in its tokenizer) learns the synthetic corpus to F1 0.6 in 40 steps (~20 s)."""
    from conftest import train_in_process

    root = tmp_path_factory.mktemp("ner-llama")
    recipe = ner_recipe(root / "ner.yaml", tiny_llama, ner_data, max_steps=40, per_device_train_batch_size=16)
    return train_in_process(recipe, root / "run")


# ---------------------------------------------------------------- tags and metrics


def test_schemes_are_detected_and_converted_to_iob2():
    where = lambda i, j: f"s{i} w{j}"  # noqa: E731
    assert detect_scheme([["B-PER", "I-PER", "O"]], "auto", where) == "IOB2"
    assert detect_scheme([["I-PER", "I-PER", "O", "I-LOC", "B-LOC"]], "auto", where) == "IOB1"
    assert detect_scheme([["S-PER", "O", "B-LOC", "E-LOC"]], "auto", where) == "BIOES"
    assert to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC"], "IOB1") == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC"]
    assert to_iob2(["S-PER", "O", "B-LOC", "I-LOC", "E-LOC"], "BIOES") == ["B-PER", "O", "B-LOC", "I-LOC", "I-LOC"]
    with pytest.raises(DataError, match="s0 w1: tag 'I-LOC' after 'B-PER' breaks IOB2"):
        detect_scheme([["B-PER", "I-LOC"]], "IOB2", where)
    with pytest.raises(DataError, match="tag 'PERSON' is not O or B-/I-/E-/S-"):
        detect_scheme([["PERSON"]], "auto", where)


def test_entity_metrics_are_strict_iob2_as_seqeval():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["I-ORG", "O"]]  # a type error, and an entity that starts with I-
    r = entity_report(gold, pred)
    # strict mode: the I-ORG start is no entity, so 1 of 2 predicted entities and 1 of 3 gold ones are right
    assert r["precision"] == pytest.approx(1 / 2) and r["recall"] == pytest.approx(1 / 3) and r["f1"] == pytest.approx(0.4)
    assert r["token_accuracy"] == pytest.approx(4 / 6)
    assert r["per_type"]["PER"]["f1"] == 1.0 and r["per_type"]["LOC"]["recall"] == 0.0
    cm = r["confusion_matrix"]
    assert cm["matrix"][cm["labels"].index("LOC")][cm["labels"].index("ORG")] == 1  # gold LOC span predicted ORG
    assert cm["matrix"][cm["labels"].index("ORG")][cm["labels"].index("O")] == 1  # gold ORG missed


def test_words_and_character_spans():
    words, offsets = split_words("Angela Merkel visited Paris.")
    assert words == ["Angela", "Merkel", "visited", "Paris", "."]
    assert [("Angela Merkel visited Paris."[a:b]) for a, b in offsets] == words
    assert spans(["B-PER", "I-PER", "O", "I-LOC"]) == [("PER", 0, 2), ("LOC", 3, 4)]


# ---------------------------------------------------------------- data


def test_conll_files_read_with_docstart_skipped(tmp_path, tiny_bert):
    rows = corpus(12, 0)
    folder = tmp_path / "d"
    folder.mkdir()
    write_conll(folder / "train.conll", rows)
    write_conll(folder / "test.txt", rows[:4], docstart=False)
    (folder / "README.txt").write_text("not a split")
    data, _ = prepare(tiny_bert, folder)
    assert len(data.train) == 12 and data.eval_words == [r["tokens"] for r in rows[:4]]
    assert data.eval_gold == [r["ner_tags"] for r in rows[:4]]


def test_bad_tags_are_reported_with_file_and_line(tmp_path, tiny_bert):
    rows = corpus(3, 0)
    rows[1]["ner_tags"][:2] = ["B-PER", "I-LOC"]  # an I- of another type than the entity it would continue
    path = write_conll(tmp_path / "bad.conll", rows)
    line = 2 + len(rows[0]["tokens"]) + 1 + 1 + 1  # DOCSTART, blank, sentence 1, blank: sentence 2's second word
    with pytest.raises(DataError, match=rf"bad.conll \[train\] line {line}: tag 'I-LOC' after 'B-PER' breaks IOB2"):
        prepare(tiny_bert, path, eval_split="none")
    rows = corpus(3, 0)
    rows[2]["ner_tags"] = rows[2]["ner_tags"][:-1]
    with pytest.raises(DataError, match=r"row 3: \d+ words but \d+ tags; give one tag per word"):
        prepare(tiny_bert, write_ner_jsonl(tmp_path / "short.jsonl", rows), eval_split="none")


def test_integer_tags_take_names_from_labels_or_classlabel_features(tmp_path, tiny_bert):
    import datasets

    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    rows = corpus(20, 0)
    ids = [[names.index(t) for t in r["ner_tags"]] for r in rows]
    write_ner_jsonl(tmp_path / "ints.jsonl", [{"tokens": r["tokens"], "ner_tags": i} for r, i in zip(rows, ids)])
    data, _ = prepare(tiny_bert, tmp_path / "ints.jsonl", eval_split="none", labels=names)
    assert data.label_names == names
    with pytest.raises(DataError, match="integer tags need their names"):
        prepare(tiny_bert, tmp_path / "ints.jsonl", eval_split="none")
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    datasets.Dataset.from_dict({"tokens": [r["tokens"] for r in rows], "ner_tags": ids}, features=features).to_parquet(
        str(tmp_path / "hub.parquet"))
    data, _ = prepare(tiny_bert, tmp_path / "hub.parquet", eval_split="none")
    first = [data.label_names[i] for i in data.train[0]["labels"] if i != -100]
    assert first == rows[0]["ner_tags"] or sorted(first) == sorted(rows[0]["ner_tags"])  # row order is shuffled by take


def test_bioes_data_with_bioes_labels_trains_on_iob2_names(tmp_path, tiny_bert):
    rows = [{"tokens": ["Maria", "visited", "New", "York"], "ner_tags": [0, 4, 1, 3]}] * 4
    path = write_ner_jsonl(tmp_path / "bioes.jsonl", rows)
    data, _ = prepare(tiny_bert, path, eval_split="none", labels=["S-PER", "B-LOC", "I-LOC", "E-LOC", "O"])
    assert data.label_names == ["B-PER", "B-LOC", "I-LOC", "O"]
    assert any("BIOES detected; tags converted to IOB2" in n for n in data.notes)


def test_first_subword_labelled_or_all_with_label_all_tokens(tmp_path, tiny_bert):
    rows = [{"tokens": ["Merkelstadtberg", "visited", "Paris"], "ner_tags": ["B-PER", "O", "B-LOC"]}] * 4
    path = write_ner_jsonl(tmp_path / "one.jsonl", rows)
    data, tok = prepare(tiny_bert, path, eval_split="none")
    enc = tok(rows[0]["tokens"], is_split_into_words=True)
    n_sub = sum(1 for w in enc.word_ids() if w == 0)
    assert n_sub > 1  # the long word really splits
    names = data.label_names
    labels = data.train[0]["labels"]
    assert [names[i] if i >= 0 else None for i in labels[1:1 + n_sub]] == ["B-PER"] + [None] * (n_sub - 1)
    data, _ = prepare(tiny_bert, path, eval_split="none", label_all_tokens=True)
    labels = data.train[0]["labels"]
    assert [data.label_names[i] for i in labels[1:1 + n_sub]] == ["B-PER"] + ["I-PER"] * (n_sub - 1)


def test_truncated_words_are_counted_not_silently_dropped(tmp_path, tiny_bert):
    rows = [{"tokens": ["word"] * 40, "ner_tags": ["O"] * 40}] * 3
    data, tok = prepare(tiny_bert, write_ner_jsonl(tmp_path / "long.jsonl", rows), eval_split="none", max_length=16)
    kept = len({w for w in tok(rows[0]["tokens"], is_split_into_words=True, truncation=True, max_length=16).word_ids() if w is not None})
    assert 0 < kept < 40
    assert any(f"cut {3 * (40 - kept)} word(s) from 3 sentence(s)" in n for n in data.notes), data.notes


def test_recipe_checks_for_token_classification(tmp_path):
    with pytest.raises(RecipeError, match="tag_scheme: 'BIO' is not one of auto"):
        recipe_for("m", tmp_path, tag_scheme="BIO")
    with pytest.raises(RecipeError, match="clean_lowercase: apply to task: sequence-classification only"):
        recipe_for("m", tmp_path, clean_lowercase=True)
    with pytest.raises(RecipeError, match="label_all_tokens: apply to task: token-classification only"):
        resolve({"model_name_or_path": "m", "dataset_name": str(tmp_path), "label_all_tokens": True})
    with pytest.raises(RecipeError, match="source_template: not a format string"):
        resolve({"model_name_or_path": "m", "dataset_name": str(tmp_path), "source_template": "{"})


# ---------------------------------------------------------------- a trained run, downstream


def test_run_dir_metrics_and_eval_files(ner_llama):
    m = json.loads((ner_llama / "metrics.json").read_text())
    assert m["eval_f1"] > 0.5  # the corpus is learnable: a broken alignment or metric stays near 0
    assert set(m["eval_per_type"]) == {"PER", "LOC", "ORG"} and 0 < m["eval_token_accuracy"] <= 1
    assert (ner_llama / "confusion_matrix.png").stat().st_size > 0
    rows = json_lines((ner_llama / "eval_predictions.jsonl").read_text())
    assert len(rows) == 40
    gold_f1 = entity_report([r["tags"] for r in rows], [r["pred_tags"] for r in rows])["f1"]
    assert gold_f1 == pytest.approx(m["eval_f1"])
    for r in rows:
        for e in r["gold_entities"] + r["pred_entities"]:
            assert r["text"][e["start"]:e["end"]] == e["word"]


def test_eval_and_predict_cli(ner_llama, ner_data, tmp_path, capsys):  # noqa: F811
    rc, out, _ = cli(capsys, "eval", ner_llama, "--dataset_name", ner_data / "test.jsonl")
    assert rc == 0
    m = json.loads(out)
    assert m["eval_f1"] == pytest.approx(json.loads((ner_llama / "metrics.json").read_text())["eval_f1"])
    text = "Angela Merkel visited Paris ."
    rc, out, _ = cli(capsys, "predict", ner_llama, "--text", text)
    (row,) = json_lines(out)
    assert rc == 0 and row["text"] == text
    for e in row["entities"]:
        assert set(e) == {"entity_group", "word", "start", "end", "score"} and text[e["start"]:e["end"]] == e["word"]
    # pre-tokenized input, to a file: the same words give the same entities
    src = write_ner_jsonl(tmp_path / "in.jsonl", [{"tokens": text.split()}])
    rc, _, _ = cli(capsys, "predict", ner_llama, "--input", src, "--text_column", "tokens", "--output", tmp_path / "o.jsonl")
    assert rc == 0 and json_lines((tmp_path / "o.jsonl").read_text()) == [row]


def test_serve_token_classify_equals_predict(ner_llama, gpt2_run):
    from fastapi.testclient import TestClient

    from lora_ft.inference import load_run
    from lora_ft.serving.app import ServeSettings, build_app
    from lora_ft.serving.registry import load_models
    from lora_ft.tasks.token_classification import predict

    served = load_models([f"ner={ner_llama}", f"cls={gpt2_run.run_dir}"])
    c = TestClient(build_app(served, ServeSettings()), raise_server_exceptions=False, base_url="http://localhost")
    texts = ["Angela Merkel visited Paris .", "Siemens opened an office in Rome .", "nothing here"]
    r = c.post("/v1/token-classify", json={"model": "ner", "inputs": texts})
    assert r.status_code == 200, r.text
    model, tok, recipe = load_run(ner_llama)
    want = predict(model, tok, texts, recipe)
    got = r.json()["results"]
    assert [[(e["entity_group"], e["start"], e["end"]) for e in g["entities"]] for g in got] == \
        [[(e["entity_group"], e["start"], e["end"]) for e in w["entities"]] for w in want]
    bad = c.post("/v1/classify", json={"model": "ner", "inputs": texts})
    assert bad.status_code == 400 and "/v1/token-classify" in bad.json()["error"]["message"]
    assert c.post("/v1/token-classify", json={"model": "cls", "inputs": texts}).status_code == 400


def test_merge_onnx_and_bnb4_exports_verified(ner_llama, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert main(["merge", str(ner_llama), "--output", str(merged)]) == 0
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["status"] == "ok" and report["metric"]["name"] == "f1"
    assert report["metric"]["adapter"] == pytest.approx(report["metric"]["merged"])
    text = "Angela Merkel visited Paris ."
    _, a, _ = cli(capsys, "predict", ner_llama, "--text", text)
    _, b, _ = cli(capsys, "predict", merged, "--text", text)
    assert [(e["entity_group"], e["start"]) for e in json.loads(a)["entities"]] == \
        [(e["entity_group"], e["start"]) for e in json.loads(b)["entities"]]
    assert main(["export", str(merged), "--format", "onnx", "--output", str(tmp_path / "onnx")]) == 0
    onnx = json.loads((tmp_path / "onnx" / "export_report.json").read_text())
    assert onnx["verified"] and onnx["argmax_agreement"] == 1.0 and onnx["task"] == "token-classification"
    assert main(["export", str(merged), "--format", "bnb4", "--output", str(tmp_path / "bnb4")]) == 0
    assert json.loads((tmp_path / "bnb4" / "export_report.json").read_text())["word_tag_agreement"] >= 0.5


def test_plain_peft_reload_gives_the_same_predictions(ner_llama):
    import torch
    from peft import AutoPeftModelForTokenClassification
    from transformers import AutoTokenizer

    from lora_ft.config import load_run_recipe
    from lora_ft.inference import load_run
    from lora_ft.tasks.token_classification import encode

    labels = load_run_recipe(ner_llama).args.labels
    tok = AutoTokenizer.from_pretrained(ner_llama)
    model = AutoPeftModelForTokenClassification.from_pretrained(
        ner_llama, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
        pad_token_id=tok.pad_token_id).eval()
    ours, _, recipe = load_run(ner_llama)
    enc = encode(tok, ["Angela Merkel visited Paris ."], recipe.args)
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, ours(**enc).logits)


def test_push_card_and_its_snippet_runs(ner_llama, tiny_llama, tmp_path, capsys):
    from lora_ft.hub import stage
    from lora_ft.inference import load_run
    from lora_ft.tasks.token_classification import predict

    stage(ner_llama, tmp_path / "staged", "me/ner", base_model=str(tiny_llama))
    card = (tmp_path / "staged" / "README.md").read_text()
    assert "pipeline_tag: token-classification" in card and "AutoPeftModelForTokenClassification" in card
    code = card.split("## Usage")[1].split("```python\n")[1].split("```")[0].replace('repo = "me/ner"', f"repo = {str(tmp_path / 'staged')!r}")
    capsys.readouterr()
    exec(compile(code, "card-snippet", "exec"), {})
    printed = [ln.split() for ln in capsys.readouterr().out.splitlines()]
    model, tok, recipe = load_run(ner_llama)
    ents = predict(model, tok, ["Angela Merkel visited Paris ."], recipe)[0]["entities"]
    tagged = {w: t for w, t in printed}
    for e in ents:
        assert tagged[e["word"].split()[0]] == f"B-{e['entity_group']}"
    proc = run_cli("push", ner_llama, "--repo-id", "me/ner", "--dry-run", "--output", tmp_path / "dry", "--base-model", "me/tiny-llama")
    assert proc.returncode == 0, proc.stderr


def test_doctor_checks_the_token_head_and_plan_runs(tmp_path, tiny_gpt2, ner_data, capsys):  # noqa: F811
    recipe = ner_recipe(tmp_path / "gpt2.yaml", tiny_gpt2, ner_data)
    rc, out, _ = cli(capsys, "doctor", recipe)
    assert rc == 0 and re.search(r"classifier head\s+pass\s+classifier new", out) and re.search(r"pad token\s+warn", out)
    rc, out, _ = cli(capsys, "plan", recipe)
    assert rc == 0 and "proposal" in out


def test_gpt2_token_classifier_gets_a_pad_token_id(tmp_path, tiny_gpt2, ner_data):  # noqa: F811
    from conftest import train_in_process
    from lora_ft.inference import load_run

    run = train_in_process(ner_recipe(tmp_path / "g.yaml", tiny_gpt2, ner_data, max_steps=2, eval_split="none"), tmp_path / "run")
    model, tok, _ = load_run(run)
    assert model.config.pad_token_id == tok.pad_token_id is not None


def test_byte_level_words_are_tokenized_as_in_running_text(tiny_gpt2, tiny_bert):
    """GPT-2-style BPE: split words get their leading space back, so the tokens equal those of the sentence."""
    from transformers import AutoTokenizer

    from lora_ft.tasks.token_classification import encode, spaced_words

    args = recipe_for("m", "d").args
    text = "Angela Merkel visited Paris ."
    for path, spaced in ((tiny_gpt2, True), (tiny_bert, False)):
        tok = AutoTokenizer.from_pretrained(path)
        assert spaced_words(tok) is spaced
        assert encode(tok, [text], args, return_tensors=None)["input_ids"][0] == tok(text)["input_ids"]
