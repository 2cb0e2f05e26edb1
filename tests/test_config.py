"""Recipe parsing: YAML + `--key value` overrides, typed coercion, every problem reported at once."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import write_recipe
from lora_ft.config import (
    RECIPE_FILE,
    TRAINER_DEFAULTS,
    coerce,
    load_recipe,
    load_run_recipe,
    parse_overrides,
    resolve,
    save_recipe,
)
from lora_ft.errors import RecipeError, RunDirError

BASE = {"model_name_or_path": "some/model", "dataset_name": "some/data"}


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(RecipeError) as exc:
        resolve(raw)
    return exc.value.problems


# ---------------------------------------------------------------- overrides


def test_overrides_win_over_yaml(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", **BASE, learning_rate=1e-3, lora_r=16, max_length=64)
    r = load_recipe(path, ["--learning_rate", "5e-4", "--lora_r=4"])
    assert r.learning_rate == 5e-4
    assert r.args.lora_r == 4
    assert r.args.max_length == 64  # untouched keys keep the file's value
    assert r.source == str(path)


def test_parse_overrides_forms():
    got = parse_overrides(["--use-dora", "--lora_r", "8", "--labels=[a, b]", "--system_prompt", "", "--dataset_name", "x.csv"])
    assert got == {"use_dora": "true", "lora_r": "8", "labels": "[a, b]", "system_prompt": "", "dataset_name": "x.csv"}
    r = load_recipe(None, ["--model_name_or_path", "m", *[f"--{k}={v}" for k, v in got.items()]])
    assert (r.args.use_dora, r.args.lora_r, r.args.labels, r.args.system_prompt) == (True, 8, ["a", "b"], "")


def test_cli_text_values_stay_text():
    """YAML would read `no` as false and `a: {b}` as a mapping; text keys must keep what was typed."""
    r = load_recipe(None, ["--model_name_or_path", "m", "--dataset_name", "d", "--task", "seq2seq", "--eval_strategy", "no",
                           "--source_template", "question: {question} context: {context}", "--lora_target_modules", "all-linear"])
    assert r.trainer["eval_strategy"] == "no"
    assert r.args.source_template == "question: {question} context: {context}"
    assert r.args.lora_target_modules == "all-linear"


def test_parse_overrides_rejects_stray_words():
    with pytest.raises(RecipeError) as exc:
        parse_overrides(["--lora_r", "8", "9"])
    assert "'9'" in exc.value.problems[0]


# ---------------------------------------------------------------- coercion


def test_yaml_exponent_string_becomes_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model_name_or_path: m\ndataset_name: d\nlearning_rate: 3e-4\nlora_dropout: 1e-1\n", encoding="utf-8")
    assert yaml.safe_load(path.read_text())["learning_rate"] == "3e-4"  # the YAML 1.1 quirk this guards against
    r = load_recipe(path)
    assert r.learning_rate == pytest.approx(3e-4) and isinstance(r.learning_rate, float)
    assert r.args.lora_dropout == pytest.approx(0.1)


def test_string_booleans_ints_and_comma_lists():
    r = resolve({**BASE, "use_dora": "true", "use_peft": "False", "lora_r": "8", "labels": "neg, neu,pos",
                 "lora_target_modules": "q_proj,v_proj", "gradient_accumulation_steps": "2"})
    assert r.args.use_dora is True and r.args.use_peft is False
    assert r.args.lora_r == 8
    assert r.args.labels == ["neg", "neu", "pos"]
    assert r.args.lora_target_modules == ["q_proj", "v_proj"]
    assert r.trainer["gradient_accumulation_steps"] == 2


@pytest.mark.parametrize("value, tp, expected", [
    ("3e-4", float, 3e-4), (2, float, 2.0), ("yes", bool, True), ("no", bool, False), (4.0, int, 4), (7, str, "7"),
])
def test_coerce_accepts(value, tp, expected):
    ok, got, _ = coerce(value, tp)
    assert ok and got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, tp", [("abc", int), (True, int), (2.5, int), ("fast", float), ("maybe", bool), ([1], str)])
def test_coerce_rejects(value, tp):
    ok, _, why = coerce(value, tp)
    assert not ok and repr(value) in why


# ---------------------------------------------------------------- errors


def test_unknown_key_suggests_the_close_one():
    (p,) = problems_of({**BASE, "lerning_rate": 1e-3})
    assert p.startswith("lerning_rate: unknown recipe key") and "did you mean 'learning_rate'" in p


def test_unknown_key_without_a_close_match_points_to_help_keys():
    (p,) = problems_of({**BASE, "zzz_not_a_key": 1})
    assert "zzz_not_a_key" in p and "--help-keys" in p


def test_wrong_type_names_key_and_value():
    (p,) = problems_of({**BASE, "lora_r": "sixteen"})
    assert p.startswith("lora_r:") and "integer" in p and "sixteen" in p


def test_every_problem_is_reported_at_once():
    probs = problems_of({"lora_r": "x", "lerning_rate": 1, "num_train_epochs": "many", "load_in_4bit": True,
                         "load_in_8bit": True, "lora_dropout": 1.5})
    joined = "\n".join(probs)
    for culprit in ("lora_r:", "lerning_rate:", "num_train_epochs:", "model_name_or_path:", "dataset_name:",
                    "load_in_4bit, load_in_8bit", "lora_dropout:"):
        assert culprit in joined, f"{culprit} missing from {probs}"
    assert len(probs) == 7


@pytest.mark.parametrize("raw, culprit", [
    ({"task": "translation"}, "task:"),
    ({"use_peft": False, "load_in_4bit": True}, "use_peft:"),
    ({"bnb_4bit_quant_type": "int3"}, "bnb_4bit_quant_type:"),
    ({"dtype": "float64"}, "dtype:"),
    ({"labels": ["a", "a"]}, "labels:"),
    ({"labels": ["only"]}, "labels:"),
    ({"eval_size": 1.5}, "eval_size:"),
    ({"max_train_samples": 0}, "max_train_samples:"),
    ({"learning_rate": -1.0}, "learning_rate:"),
    ({"bf16": True, "fp16": True}, "bf16, fp16:"),
    ({"source_template": "Review: {review}"}, "source_template:"),  # a classification template holds text_column
    ({"source_template": "no field at all"}, "source_template:"),
])
def test_bad_combinations_fail_before_loading(raw, culprit):
    probs = problems_of({**BASE, **raw})
    assert any(p.startswith(culprit) for p in probs), probs


# ---------------------------------------------------------------- trainer keys and defaults


def test_trainer_arguments_are_accepted_and_typed():
    r = resolve({**BASE, "gradient_accumulation_steps": 4, "weight_decay": "0.01", "lr_scheduler_type": "cosine",
                 "eval_on_start": "true", "per_device_train_batch_size": 2})
    assert r.trainer["gradient_accumulation_steps"] == 4
    assert r.trainer["weight_decay"] == 0.01
    assert r.trainer["lr_scheduler_type"] == "cosine"
    assert r.trainer["eval_on_start"] is True
    assert r.per_device_train_batch_size == 2  # a recipe key beats lora_ft's trainer default (16)
    assert r.per_device_eval_batch_size == TRAINER_DEFAULTS["per_device_eval_batch_size"]


def test_trainer_argument_of_wrong_type():
    (p,) = problems_of({**BASE, "gradient_accumulation_steps": "lots"})
    assert p.startswith("gradient_accumulation_steps:") and "lots" in p


def test_defaults_and_output_dir_from_recipe_name(tmp_path):
    r = load_recipe(write_recipe(tmp_path / "my_exp.yaml", **BASE))
    assert r.output_dir.replace("\\", "/") == "runs/my_exp"
    assert r.args.task == "sequence-classification" and r.args.use_peft is True and r.args.lora_r == 16
    assert r.learning_rate == TRAINER_DEFAULTS["learning_rate"]


@pytest.mark.parametrize("value", ["none", "None", None])
def test_eval_split_none_trains_without_eval(value):
    r = resolve({**BASE, "eval_split": value})
    assert r.args.eval_split is None
    assert r.trainer["eval_strategy"] == "no"


def test_eval_split_none_with_an_explicit_eval_strategy_is_refused():
    """Not overridden behind the user's back: the trainer would refuse it once the model had loaded."""
    with pytest.raises(RecipeError, match="eval_strategy: 'steps' needs an eval split"):
        resolve({**BASE, "eval_split": "none", "eval_strategy": "steps"})


def test_quoted_no_strategy_is_accepted():
    r = resolve({**BASE, "save_strategy": "no", "eval_strategy": "no"})
    assert r.trainer["save_strategy"] == "no" and r.trainer["eval_strategy"] == "no"


def test_bare_no_strategy_from_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model_name_or_path: m\ndataset_name: d\nsave_strategy: no\n", encoding="utf-8")
    assert load_recipe(path, ["--eval_strategy", "no"]).trainer["save_strategy"] == "no"


def test_all_linear_stays_a_string():
    assert resolve({**BASE, "lora_target_modules": "all-linear"}).args.lora_target_modules == "all-linear"


# ---------------------------------------------------------------- files


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError) as exc:
        load_recipe(tmp_path / "nope.yaml")
    assert "nope.yaml" in exc.value.problems[0] and "not found" in exc.value.problems[0]


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model_name_or_path: m\nlabels: [a, b\ndataset_name: d\n", encoding="utf-8")
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    (p,) = exc.value.problems
    assert "bad.yaml" in p and "line" in p and "YAML" in p


@pytest.mark.parametrize("body", ["- a\n- b\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path, body):
    path = tmp_path / "r.yaml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(path)


def test_saved_recipe_round_trips_and_redacts_tokens(tmp_path):
    r = resolve({**BASE, "labels": ["b", "a"], "lora_r": 4, "hub_token": "hf_abcdefghijklmnopqrstuvwxyz123456",
                 "eval_split": "none", "column_map": {"sentiment": "label"}})
    save_recipe(r, tmp_path)
    text = (tmp_path / RECIPE_FILE).read_text(encoding="utf-8")
    assert "hf_abcdefghijklmnopqrstuvwxyz" not in text
    back = load_run_recipe(tmp_path)
    assert back.args == r.args
    assert {k: v for k, v in back.trainer.items() if k != "hub_token"} == {k: v for k, v in r.trainer.items() if k != "hub_token"}


def test_load_run_recipe_needs_the_file(tmp_path):
    with pytest.raises(RunDirError, match=RECIPE_FILE):
        load_run_recipe(tmp_path)


# ---------------------------------------------------------------- no setting silently ignored


@pytest.mark.parametrize("steps, strategy", [("save_steps", "save_strategy"), ("eval_steps", "eval_strategy")])
def test_steps_without_their_strategy_switch_it_to_steps(steps, strategy):
    """transformers applies save_steps / eval_steps only under the `steps` strategy; lora_ft's default is `epoch`."""
    r = resolve({**BASE, steps: 10})
    assert r.trainer[strategy] == "steps" and not r.notes
    kept = resolve({**BASE, steps: 10, strategy: "epoch"})  # said explicitly: kept, and the inert key is named
    assert kept.trainer[strategy] == "epoch"
    assert kept.notes == [f"{steps}: has no effect with {strategy}: epoch; set {strategy}: steps"]


def test_switched_strategy_survives_the_saved_recipe(tmp_path):
    r = resolve({**BASE, "save_steps": 5})
    save_recipe(r, tmp_path)
    back = load_run_recipe(tmp_path)
    assert back.trainer["save_strategy"] == "steps" and back.trainer["save_steps"] == 5 and not back.notes


def test_eval_steps_without_an_eval_split_is_named():
    r = resolve({**BASE, "eval_split": "none", "eval_steps": 10})
    assert r.trainer["eval_strategy"] == "no"
    assert r.notes == ["eval_steps: has no effect with eval_split: none; set eval_strategy: steps"]


@pytest.mark.parametrize("raw, note", [
    ({"use_peft": False, "lora_r": 32}, "lora_r: has no effect with use_peft: false"),
    ({"use_peft": False, "use_dora": True}, "use_dora: has no effect with use_peft: false"),
    ({"bnb_4bit_quant_type": "fp4"}, "bnb_4bit_quant_type: has no effect with load_in_4bit: false"),
    ({"use_bnb_nested_quant": True}, "use_bnb_nested_quant: has no effect with load_in_4bit: false"),
    ({"augment_copies": 3}, "augment_copies: has no effect with augment: none"),
    ({"eval_split": "none", "max_eval_samples": 10}, "max_eval_samples: has no effect with eval_split: none"),
    ({"max_steps": 10, "num_train_epochs": 3}, "num_train_epochs: has no effect with max_steps: 10 (max_steps wins)"),
])
def test_inert_keys_are_named_with_the_key_that_disables_them(raw, note):
    assert resolve({**BASE, **raw}).notes == [note]


def test_defaults_and_effective_keys_raise_no_note():
    assert resolve({**BASE, "lora_r": 32, "load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "max_steps": 5}).notes == []


def test_trainer_keys_snapshot_matches_the_installed_libraries():
    """lora_ft/trainer_keys.json lets a recipe be checked without importing transformers. It must say what the
    pinned transformers and trl say; after an upgrade: python -m lora_ft.trainer_keys"""
    from lora_ft import trainer_keys

    snap = json.loads(trainer_keys.SNAPSHOT.read_text(encoding="utf-8"))
    assert snap == json.loads(json.dumps(trainer_keys.build_snapshot())), "run: python -m lora_ft.trainer_keys"


def test_trainer_keys_read_from_the_classes_when_the_snapshot_is_for_other_versions(monkeypatch):
    from lora_ft import trainer_keys

    fast = trainer_keys.trainer_fields("training")
    trainer_keys.trainer_fields.cache_clear()
    monkeypatch.setattr(trainer_keys, "installed_versions", lambda: {"transformers": "5.99.0", "trl": "1.16.0"})
    try:
        slow = trainer_keys.trainer_fields("training")
    finally:
        trainer_keys.trainer_fields.cache_clear()
    assert set(slow) == set(fast) and "learning_rate" in slow
    for fields in (fast, slow):
        ok, _, why = coerce("stepz", fields["eval_strategy"])
        assert not ok and "steps" in why  # an enum's choices, not any string


def test_best_model_save_steps_must_be_a_multiple_of_the_logging_steps_eval_falls_back_to():
    with pytest.raises(RecipeError, match="multiple of eval_steps .10, from logging_steps"):
        resolve({**BASE, "eval_strategy": "steps", "save_strategy": "steps", "save_steps": 25, "load_best_model_at_end": True})
    resolve({**BASE, "eval_strategy": "steps", "save_strategy": "steps", "save_steps": 20, "load_best_model_at_end": True})
