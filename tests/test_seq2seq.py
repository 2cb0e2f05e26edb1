"""Seq2seq task and the QA metrics: SQuAD-normalised EM / F1 and ROUGE-L on known strings, source templates and
`answers` targets, and the CLI end to end on a tiny random T5 with the byte-level ByT5 tokenizer.
"""

from __future__ import annotations

import json

import pytest

from fixtures_gen import json_lines, squad_slice, tiny_t5, write_jsonl, write_recipe  # noqa: F401
from lora_ft.cli import main
from lora_ft.config import resolve
from lora_ft.errors import DataError
from lora_ft.metrics import exact_match, normalize_answer, qa_scores, rouge_l, token_f1
from lora_ft.tasks import seq2seq

FAST = {"task": "seq2seq", "max_steps": 4, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 32,
        "eval_strategy": "no", "save_strategy": "no", "report_to": "none", "logging_steps": 1, "disable_tqdm": True,
        "bf16": False, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 1e-3, "warmup_steps": 0,
        "seed": 0, "source_template": "question: {question} context: {context}", "target_column": "answers",
        "max_length": 128, "max_target_length": 16, "generation_max_new_tokens": 8}
# Short one-word answers: a byte-level decoder this small stumbles over repeated letters ("banana", "Moon").
FACTS = [("What color is the sky?", "blue"), ("Capital of France?", "Paris"), ("Legs on a cat?", "four"),
         ("What orbits Earth?", "Luna")]


def cli_out(capsys, *argv) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------- metrics on known strings


def test_normalize_answer_is_squads():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Theory of the case") == "theory of case"  # whole words only: "Theory" keeps "the"


def test_exact_match_takes_the_best_reference():
    assert exact_match("the Broncos.", ["Denver Broncos", "Broncos"]) == 1.0
    assert exact_match("Denver", ["Denver Broncos", "Broncos"]) == 0.0


def test_token_f1_known_values():
    assert token_f1("Denver Broncos", ["Broncos"]) == pytest.approx(2 / 3)  # P 1/2, R 1
    assert token_f1("Carolina Panthers", ["Denver Broncos", "the Carolina Panthers"]) == 1.0
    assert token_f1("x y x", ["x x z"]) == pytest.approx(2 / 3)  # counts multiplicity: 2 common of 3 and 3
    assert token_f1("a cat", ["the cat"]) == 1.0  # articles dropped before counting
    assert token_f1("nothing", ["else"]) == 0.0


def test_rouge_l_known_values():
    assert rouge_l("the cat sat on the mat", ["the cat lay on the mat"]) == pytest.approx(5 / 6)
    assert rouge_l("a b c d", ["a x c y"]) == pytest.approx(0.5)  # LCS "a c": P = R = 1/2
    assert rouge_l("Denver Broncos.", ["denver broncos"]) == 1.0  # punctuation is not part of a word
    assert rouge_l("Beyoncé", ["beyoncé"]) == 1.0
    assert rouge_l("x", ["y", "x y"]) == pytest.approx(2 / 3)  # best of the references
    assert rouge_l("", ["x"]) == 0.0


def test_qa_scores_averages_as_percentages():
    s = qa_scores(["Denver Broncos", "wrong"], [["Denver Broncos"], ["right"]])
    assert s == {"exact_match": 50.0, "f1": 50.0, "rouge_l": 0.5}


# ---------------------------------------------------------------- data


def test_references_and_sources(tmp_path):
    assert seq2seq.references({"text": ["a", "b"], "answer_start": [0, 5]}) == ["a", "b"]
    assert seq2seq.references(["a"]) == ["a"] and seq2seq.references("a") == ["a"]
    recipe = resolve({"model_name_or_path": "unused", "dataset_name": "x", **FAST})
    assert seq2seq.source_of({"question": "Q?", "context": "C."}, recipe.args) == "question: Q? context: C."


def test_prepare_trains_on_the_first_answer_and_keeps_all_as_references(tmp_path):
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    rows = [{"question": "Who?", "context": "Bob did.", "answers": {"text": ["Bob", "bob"], "answer_start": [0, 0]}},
            {"question": "No?", "context": "x", "answers": {"text": [], "answer_start": []}}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "dev.jsonl", rows)
    recipe = resolve({"model_name_or_path": "unused", "dataset_name": str(tmp_path), "eval_split": "dev", **FAST})
    data = seq2seq.prepare_data(recipe, tok)
    assert len(data.train) == 1 and any("without a target" in n for n in data.notes)
    assert tok.decode(data.train[0]["labels"]) == "Bob</s>"
    assert tok.decode(data.train[0]["input_ids"]) == "question: Who? context: Bob did.</s>"
    assert data.eval_references == [["Bob", "bob"]]


def test_null_targets_are_dropped_and_counted(tmp_path):
    from transformers import ByT5Tokenizer

    rows = [{"question": "Who?", "context": "Bob did.", "answers": "Bob"},
            {"question": "Null?", "context": "x", "answers": None},
            {"question": "Null in a list?", "context": "x", "answers": {"text": [None], "answer_start": [0]}}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = resolve({"model_name_or_path": "unused", "dataset_name": str(tmp_path / "train.jsonl"), "eval_split": "none", **FAST})
    data = seq2seq.prepare_data(recipe, ByT5Tokenizer())
    assert len(data.train) == 1 and "dropped 2 row(s) without a target" in " ".join(data.notes)
    assert seq2seq.references(None) == [] and seq2seq.references(["a", None]) == ["a"]


def test_template_field_missing_from_the_data(tmp_path):
    from transformers import ByT5Tokenizer

    write_jsonl(tmp_path / "train.jsonl", [{"question": "Who?", "answers": "Bob"}])
    recipe = resolve({"model_name_or_path": "unused", "dataset_name": str(tmp_path / "train.jsonl"), **FAST})
    with pytest.raises(DataError, match="context"):
        seq2seq.prepare_data(recipe, ByT5Tokenizer())


# ---------------------------------------------------------------- end to end


def train_run(root, name, model, data, **keys):
    recipe = write_recipe(root / f"{name}.yaml", model_name_or_path=str(model), dataset_name=str(data), **{**FAST, **keys})
    assert main(["train", str(recipe), "--output_dir", str(root / name)]) == 0
    return root / name


def test_squad_slice_train_generate_eval(tmp_path, tiny_t5, squad_slice, capsys):
    run = train_run(tmp_path, "squad", tiny_t5, squad_slice, eval_split="dev")
    assert (run / "adapter_model.safetensors").is_file() and (run / "adapter_config.json").is_file()
    m = json.loads((run / "metrics.json").read_text())
    for k in ("eval_loss", "eval_exact_match", "eval_f1", "eval_rouge_l"):
        assert isinstance(m[k], float), k
    preds = [json.loads(x) for x in (run / "eval_predictions.jsonl").read_text().splitlines()]
    dev = [json.loads(x) for x in (squad_slice / "dev.jsonl").read_text().splitlines()]
    assert len(preds) == 32
    assert [p["references"] for p in preds] == [r["answers"]["text"] for r in dev]  # row order kept

    prompts = ["question: Who? context: Bob did.", "question: Where? context: In Paris."]
    out = json_lines(cli_out(capsys, "generate", run, "--max_new_tokens", 4, *[x for p in prompts for x in ("--prompt", p)]))
    assert [o["prompt"] for o in out] == prompts and all(isinstance(o["completion"], str) for o in out)

    e = json.loads(cli_out(capsys, "eval", run, "--dataset_name", squad_slice, "--split", "dev", "--max_eval_samples", 4))
    assert e["split"] == "dev" and e["eval_samples"] == 4
    assert {"eval_exact_match", "eval_f1", "eval_rouge_l"} <= set(e)


def test_memorizes_a_handful_of_answers(tmp_path, tiny_t5, capsys):
    """Plumbing: trained targets come back from `generate` and score EM 100 in `eval`. A random T5 this small
    does not get there with LoRA in a few dozen steps, so this one trains all weights."""
    rows = [{"question": q, "answer": a} for q, a in FACTS]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "test.jsonl", rows)
    run = train_run(tmp_path, "mem", tiny_t5, tmp_path / "data", source_template="question: {question}",
                    target_column="answer", use_peft=False, learning_rate=1e-2, max_steps=40, per_device_train_batch_size=4)
    assert (run / "model.safetensors").is_file() and not (run / "adapter_config.json").exists()
    assert json.loads((run / "metrics.json").read_text())["eval_exact_match"] == 100.0
    e = json.loads(cli_out(capsys, "eval", run))
    assert (e["eval_exact_match"], e["eval_f1"], e["eval_samples"]) == (100.0, 100.0, len(FACTS))
    out = json_lines(cli_out(capsys, "generate", run, *[x for q, _ in FACTS for x in ("--prompt", f"question: {q}")]))
    assert [o["completion"] for o in out] == [a for _, a in FACTS]


def test_generation_cuts_sources_where_training_did(tiny_t5, monkeypatch):
    """`generate` / `eval` feed the encoder at most max_length tokens, as training did (ByT5 has no limit of its own)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from lora_ft.inference import generate_texts

    model, tok = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), AutoTokenizer.from_pretrained(tiny_t5)
    seen, real = [], model.generate
    monkeypatch.setattr(model, "generate", lambda input_ids, **kw: seen.append(input_ids.shape[1]) or real(input_ids=input_ids, **kw))
    generate_texts(model, tok, ["question: " + "x" * 200, "short"], max_new_tokens=2, max_length=32)
    assert seen == [32, len("short") + 1]


@pytest.mark.parametrize("bits", ["load_in_4bit", "load_in_8bit"])
def test_quantized_t5_trains_and_generates(tmp_path, tiny_t5, squad_slice, capsys, bits):
    run = train_run(tmp_path, bits, tiny_t5, squad_slice, eval_split="dev", max_steps=2, max_eval_samples=4, **{bits: True})
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 2
    assert (run / "generation_config.json").is_file()  # serving reads EOS ids from the run, as trained
    out = json_lines(cli_out(capsys, "generate", run, "--max_new_tokens", 3, "--prompt", "question: Who? context: Bob did."))
    assert len(out) == 1 and isinstance(out[0]["completion"], str)
