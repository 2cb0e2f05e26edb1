"""Preference task (issue 20): every method trains through trl on a tiny random Llama, the data formats are detected,
bad recipes are refused before any weights load, the reference is the adapter switched off (no second model), and
the result is an adapter run that merge and generate treat like an SFT run."""

from __future__ import annotations

import functools
import json

import pytest

from fixtures_gen import QA, chat_tok, llama_models, plain_tok, write_jsonl, write_recipe  # noqa: F401
import fixtures_gen
from lora_ft.cli import main
from lora_ft.config import resolve
from lora_ft.errors import DataError, RecipeError
from lora_ft.tasks import preference

FAST = {"task": "preference", "max_steps": 3, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
        "eval_strategy": "no", "save_strategy": "no", "report_to": "none", "logging_steps": 1, "disable_tqdm": True,
        "bf16": False, "max_length": 64, "lora_r": 8, "lora_alpha": 16, "learning_rate": 5e-3, "warmup_steps": 0,
        "seed": 0}
WRONG = ["The sea is green.", "A brick.", "Nobody at all.", "Nine legs."]


def pairs(conversational=True):
    rows = []
    for (q, a), w in zip(QA, WRONG):
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
                         "rejected": [{"role": "assistant", "content": w}]})
        else:
            rows.append({"prompt": q, "chosen": a, "rejected": w})
    return rows


def data_dir(path, rows):
    write_jsonl(path / "train.jsonl", rows * 2)
    write_jsonl(path / "test.jsonl", rows)
    return path


train_run = functools.partial(fixtures_gen.train_run, fast=FAST)


@pytest.fixture(scope="module")
def chat_pairs(tmp_path_factory):
    return data_dir(tmp_path_factory.mktemp("pref-data"), pairs())


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, llama_models, chat_pairs):
    return train_run(tmp_path_factory.mktemp("pref-run"), "dpo", llama_models[1], chat_pairs)


# ---------------------------------------------------------------- recipe refusals (no weights load)


def base(**keys):
    return {"model_name_or_path": "x", "dataset_name": "y", "task": "preference", **keys}


@pytest.mark.parametrize("keys, message", [
    ({"preference_method": "ppo"}, "preference_method: 'ppo' is not one of dpo, ipo, orpo, simpo, kto"),
    ({"preference_method": "dpo", "simpo_gamma": 0.5}, "simpo_gamma: preference_method dpo does not take it; it applies to simpo"),
    ({"preference_method": "orpo", "precompute_ref_log_probs": True}, "precompute_ref_log_probs: preference_method orpo does not take it"),
    ({"preference_method": "kto", "rpo_alpha": 1.0}, "rpo_alpha: applies to preference_method dpo or ipo"),
    ({"preference_method": "ipo", "loss_type": "sigmoid"}, "loss_type: preference_method ipo is loss_type ipo"),
    ({"preference_method": "kto", "train_sampling_strategy": "random"}, "train_sampling_strategy: KTO's KL term needs sequential"),
])
def test_bad_preference_keys_are_one_line_errors(keys, message):
    with pytest.raises(RecipeError) as e:
        resolve(base(**keys))
    assert len(e.value.problems) == 1 and message in e.value.problems[0], e.value.problems


def test_preference_keys_are_refused_in_other_tasks_and_methods_pick_their_trl_config():
    with pytest.raises(RecipeError, match="preference_method: apply to task: preference only"):
        resolve({"model_name_or_path": "x", "dataset_name": "y", "task": "causal-lm", "preference_method": "kto"})
    r = resolve(base(preference_method="simpo", simpo_gamma=1.0, beta=2.0))
    assert r.trainer["simpo_gamma"] == 1.0 and r.trainer["train_sampling_strategy"] == "group_by_length"
    assert resolve(base(preference_method="kto", desirable_weight=1.3)).trainer["train_sampling_strategy"] == "sequential"
    assert preference.training_kwargs(r.args)["loss_type"] == "simpo"
    rpo = resolve(base(rpo_alpha=0.5)).args
    assert preference.training_kwargs(rpo)["loss_type"] == ["sigmoid", "sft"]


def test_cli_refuses_an_unknown_method_before_loading(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", **base(preference_method="rlhf"))
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "preference_method: 'rlhf'" in err[0]


# ---------------------------------------------------------------- data formats


def test_formats_are_detected():
    assert preference.detect_format(["prompt", "chosen", "rejected"], "auto") == "preference"
    assert preference.detect_format(["chosen", "rejected"], "auto") == "implicit-preference"
    assert preference.detect_format(["prompt", "completion", "label"], "auto") == "unpaired"
    with pytest.raises(DataError, match="column_map"):
        preference.detect_format(["question", "answer"], "auto")


def _prepare(tmp_path, tok, rows, **keys):
    from datasets import Dataset

    r = resolve(base(**keys))
    fmt = preference.detect_format(list(rows[0]), "auto")
    dropped, notes = {}, []
    out = preference._prepare_split(Dataset.from_list(rows), tok, fmt, bool(tok.chat_template), r.args, "train", dropped, notes)
    return out, dropped, notes


def test_chat_rendering_matches_generation_and_ends_every_completion_with_end_of_turn(tmp_path, chat_tok):
    from lora_ft.inference import render_prompt

    (rows, enc), _, _ = _prepare(tmp_path, chat_tok, pairs(), system_prompt="Be brief.")
    end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    for row, e in zip(rows, enc):
        assert e["prompt_ids"] == render_prompt(chat_tok, row["prompt"][-1]["content"], True, "Be brief.")
        assert all(c[-1] == end for c in e["completions"])
        assert row["prompt"][0] == {"role": "system", "content": "Be brief."}


def test_plain_strings_implicit_prompt_and_unpaired_rows(tmp_path, plain_tok, chat_tok):
    (rows, enc), _, _ = _prepare(tmp_path, plain_tok, pairs(conversational=False))
    assert all(c[-1] == plain_tok.eos_token_id for e in enc for c in e["completions"])
    implicit = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in pairs()]
    (rows, _), _, _ = _prepare(tmp_path, chat_tok, implicit)
    assert rows[0]["prompt"][-1]["content"] == QA[0][0] and rows[0]["chosen"][0]["content"] == QA[0][1]
    unpaired = [{"prompt": q, "completion": a, "label": i % 2 == 0} for i, (q, a) in enumerate(QA)]
    (rows, enc), _, _ = _prepare(tmp_path, chat_tok, unpaired, preference_method="kto")
    assert [r["label"] for r in rows] == [True, False, True, False] and len(enc[0]["completions"]) == 1


def test_equal_empty_and_too_long_pairs_are_dropped_and_counted(tmp_path, chat_tok):
    rows = pairs(conversational=False) + [{"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},
                      {"prompt": "Empty?", "chosen": " ", "rejected": "No."},
                      {"prompt": "Long? " * 40, "chosen": "Yes.", "rejected": "No."}]
    (kept, _), dropped, notes = _prepare(tmp_path, chat_tok, rows, max_length=64)
    assert len(kept) == 4 and dropped == {"train_empty": 1, "train_equal": 1, "train_too_long": 1}
    assert any("too-long" in n for n in notes)


# ---------------------------------------------------------------- training


def _metrics(run):
    return json.loads((run / "metrics.json").read_text())


def test_dpo_run_reports_the_metrics_and_is_an_adapter_run(dpo_run, capsys):
    m = _metrics(dpo_run)
    for k in ("eval_reward_accuracy", "eval_reward_margin", "eval_samples", "eval_logps_chosen", "eval_logps_rejected",
              "eval_logp_accuracy_before", "train_runtime", "train_tokens_per_second", "train_loss", "dropped_pairs"):
        assert k in m, k
    assert m["eval_samples"] == 4 and m["preference_method"] == "dpo"
    assert (dpo_run / "adapter_config.json").is_file() and not (dpo_run / "ref").exists()
    assert (dpo_run / "preference_curves.png").is_file()
    capsys.readouterr()
    assert main(["generate", str(dpo_run), "--prompt", "Name a fruit.", "--max_new_tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_dpo_run_merges_verified(dpo_run, tmp_path):
    assert main(["merge", str(dpo_run), "--output", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


def test_reference_is_the_disabled_adapter_not_a_second_model(tmp_path, llama_models, chat_pairs, monkeypatch):
    import trl

    seen = {}
    real = trl.DPOTrainer._compute_loss

    def spy(self, model, inputs, return_outputs):
        seen["ref_model"] = self.ref_model
        seen["adapters"] = sorted(self.accelerator.unwrap_model(self.model).peft_config)
        return real(self, model, inputs, return_outputs)

    monkeypatch.setattr(trl.DPOTrainer, "_compute_loss", spy)
    train_run(tmp_path, "ref", llama_models[1], chat_pairs, max_steps=1, eval_split="none")
    assert seen == {"ref_model": None, "adapters": ["default"]}


@pytest.mark.parametrize("method, keys", [("ipo", {}), ("orpo", {}), ("simpo", {"beta": 2.0}), ("kto", {}),
                                         ("dpo", {"precompute_ref_log_probs": True, "rpo_alpha": 0.5})])
def test_each_method_trains(tmp_path, llama_models, chat_pairs, method, keys):
    run = train_run(tmp_path, method, llama_models[1], chat_pairs, preference_method=method, max_steps=2, **keys)
    m = _metrics(run)
    assert m["preference_method"] == method and 0.0 <= m["eval_reward_accuracy"] <= 1.0
    history = json.loads((run / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2]


@pytest.mark.slow
def test_continuing_an_sft_adapter_keeps_it_as_the_reference(tmp_path, llama_models, chat_pairs, dpo_run):
    run = train_run(tmp_path, "cont", llama_models[1], chat_pairs, adapter_name_or_path=str(dpo_run), max_steps=1)
    assert not (run / "ref").exists() and (run / "adapter_model.safetensors").is_file()
    # the reference is the starting adapter: before training, every implicit reward is zero
    m = _metrics(run)
    assert m["eval_logp_accuracy_before"] == _metrics(dpo_run)["eval_logp_accuracy"]


def test_ultrafeedback_rows_take_the_shared_turns_as_prompt(tmp_path, chat_tok):
    rows = [{"prompt": q, "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
             "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": w}]} for (q, a), w in zip(QA, WRONG)]
    (kept, _), _, _ = _prepare(tmp_path, chat_tok, rows)
    assert kept[0]["prompt"] == [{"role": "user", "content": QA[0][0]}]
    assert kept[0]["chosen"] == [{"role": "assistant", "content": QA[0][1]}]


@pytest.mark.slow
def test_qlora_4bit_dpo_trains(tmp_path, llama_models, chat_pairs):
    pytest.importorskip("bitsandbytes")
    run = train_run(tmp_path, "qlora", llama_models[1], chat_pairs, load_in_4bit=True, max_steps=2)
    m = _metrics(run)
    assert m["global_step"] == 2 and m["train_loss"] == m["train_loss"]  # finite


def test_doctor_plan_and_eval_know_the_task(tmp_path, llama_models, chat_pairs, dpo_run, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path=str(llama_models[1]), dataset_name=str(chat_pairs),
                          **{**FAST, "preference_method": "ipo"})
    capsys.readouterr()
    main(["doctor", str(recipe)])
    out = capsys.readouterr().out
    assert "eos in completions" in out and "chat template" in out and "FAIL" not in out
    assert main(["plan", str(recipe), "--gpu-memory", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "training pass: paired-reference" in out and "ipo (trl DPOTrainer)" in out
    from lora_ft.memory import estimate
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(llama_models[1])
    one = estimate(cfg, batch_size=4, seq_len=64, lm_head="chunked")
    two = estimate(cfg, batch_size=4, seq_len=64, lm_head="paired-reference")
    assert two.activations_gb > 2 * one.activations_gb  # two sequences and the reference pass
    assert main(["eval", str(dpo_run)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["eval_samples"] == 4 and 0 <= ev["eval_reward_accuracy"] <= 1


def test_push_card_names_method_beta_data_and_reward_accuracy(dpo_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    out = tmp_path / "staged"
    assert main(["push", str(dpo_run), "--repo-id", "me/dpo", "--base-model", "me/tiny-llama", "--dry-run", "--output", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "Preference tuning:** dpo (trl DPOTrainer), beta 0.1" in card and "reward_accuracy" in card
    assert "Dataset:" in card and not (out / "ref").exists()
