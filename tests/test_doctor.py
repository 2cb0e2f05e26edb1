"""`lora-ft doctor`: each trap is caught from config, tokenizer and data alone; train runs the same checks first."""

from __future__ import annotations

import pytest

from conftest import cls_recipe, read_rows, write_csv, write_recipe
from fixtures_gen import llama_models  # noqa: F401  (fixture used by name)
from lora_ft.cli import main
from test_causal_lm import FAST as SFT_FAST
from test_causal_lm import chat_rows, data_dir

# A template that closes turns with plain text: no special token marks the end of an answer, and no EOS either.
NO_STOP_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant: {% endif %}")


def doctor(capsys, recipe, *overrides) -> tuple[int, dict[str, tuple[str, str]]]:
    capsys.readouterr()
    rc = main(["doctor", str(recipe), *map(str, overrides)])
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines()[1:]:  # fixed columns: name (22), status (6), detail
        name, status, detail = line[:22].strip(), line[23:29].strip(), line[30:]
        if status in ("pass", "warn", "fail"):
            rows.setdefault(name, (status, detail))
    return rc, rows


def statuses(rows) -> dict[str, str]:
    return {k: v[0] for k, v in rows.items()}


def test_clean_classification_recipe(tmp_path, tiny_bert, tiny_data, capsys):
    rc, rows = doctor(capsys, cls_recipe(tmp_path / "r.yaml", tiny_bert, tiny_data))
    assert rc == 0, rows
    assert statuses(rows) == {"recipe": "pass", "model": "pass", "pad token": "pass", "max_length": "pass",
                              "classifier head": "pass", "memory": "pass", "data": "pass"}
    assert "no weights loaded" in rows["model"][1]


def test_missing_pad_token_is_a_warning_lora_ft_fixes(tmp_path, tiny_gpt2, tiny_data, capsys):
    rc, rows = doctor(capsys, cls_recipe(tmp_path / "r.yaml", tiny_gpt2, tiny_data))
    assert rc == 0 and rows["pad token"][0] == "warn" and "pad_token_id" in rows["pad token"][1]


def test_max_length_beyond_positions_fails_in_doctor_and_train(tmp_path, tiny_gpt2, tiny_data, capsys):
    recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, tiny_data, max_length=512)  # the tiny GPT-2 has 128 positions
    rc, rows = doctor(capsys, recipe)
    assert rc == 1 and rows["max_length"][0] == "fail" and "128" in rows["max_length"][1]
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "max_length" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_head_that_comes_with_the_checkpoint_must_be_listed(tmp_path, tiny_gpt2, tiny_data, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with_head = tmp_path / "with-head"
    AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, num_labels=3).save_pretrained(with_head)
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(with_head)
    rc, rows = doctor(capsys, cls_recipe(tmp_path / "r.yaml", with_head, tiny_data))
    assert rows["classifier head"][0] == "warn" and "lora_modules_to_save" in rows["classifier head"][1]
    rc, rows = doctor(capsys, cls_recipe(tmp_path / "r2.yaml", with_head, tiny_data, lora_modules_to_save=["score"]))
    assert rows["classifier head"][0] == "pass"


def test_labels_outside_the_set_fail(tmp_path, tiny_bert, tiny_data, capsys):
    rows = read_rows(tiny_data / "train.csv")
    rows[5]["label"] = "angry"
    data = tmp_path / "data"
    write_csv(data / "train.csv", rows)
    write_csv(data / "test.csv", read_rows(tiny_data / "test.csv"))
    rc, checks = doctor(capsys, cls_recipe(tmp_path / "r.yaml", tiny_bert, data))
    assert rc == 1 and checks["data"][0] == "fail" and "angry" in checks["data"][1] and "labels" in checks["data"][1]


def test_empty_split_fails(tmp_path, tiny_bert, capsys):
    data = tmp_path / "data"
    write_csv(data / "train.csv", [{"text": " ", "label": "positive"}] * 5)
    rc, checks = doctor(capsys, cls_recipe(tmp_path / "r.yaml", tiny_bert, data))
    assert rc == 1 and checks["data"][0] == "fail" and "no rows left" in checks["data"][1]


def test_8bit_with_fsdp_fails(tmp_path, tiny_llama, tiny_data, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    rc, rows = doctor(capsys, cls_recipe(tmp_path / "r.yaml", tiny_llama, tiny_data, load_in_8bit=True))
    assert rc == 1 and rows["quantization"][0] == "fail"
    rc, rows = doctor(capsys, cls_recipe(tmp_path / "r4.yaml", tiny_llama, tiny_data, load_in_4bit=True))
    assert rows["quantization"][0] == "warn" and "bnb_4bit_quant_storage" in rows["quantization"][1]


def test_memory_beyond_the_device_fails(tmp_path, tiny_bert, tiny_data, capsys, monkeypatch):
    import lora_ft.memory

    monkeypatch.setattr(lora_ft.memory, "device_memory_gb", lambda: ("RAM available", 0.01))
    rc, rows = doctor(capsys, cls_recipe(tmp_path / "r.yaml", tiny_bert, tiny_data))
    assert rc == 1 and rows["memory"][0] == "fail" and "per_device_train_batch_size" in rows["memory"][1]


def test_recipe_errors_are_failed_checks(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="m", dataset_name="d", lerning_rate=1, bf16=True, fp16=True)
    rc, rows = doctor(capsys, recipe)
    assert rc == 1 and rows["recipe"][0] == "fail"


def test_sft_checks_stop_token_and_template(tmp_path, llama_models, capsys):  # noqa: F811
    data = data_dir(tmp_path / "data", chat_rows())
    good = write_recipe(tmp_path / "good.yaml", model_name_or_path=str(llama_models[1]), dataset_name=str(data), **SFT_FAST)
    rc, rows = doctor(capsys, good)
    assert rc == 0 and rows["eos in labels"][0] == "pass" and rows["chat template"][0] == "pass"

    bad = write_recipe(tmp_path / "bad.yaml", model_name_or_path=str(llama_models[1]), dataset_name=str(data),
                       chat_template=NO_STOP_TEMPLATE, **SFT_FAST)
    rc, rows = doctor(capsys, bad)
    assert rc == 1 and rows["eos in labels"][0] == "fail" and "will not stop" in rows["eos in labels"][1]
    assert main(["train", str(bad), "--output_dir", str(tmp_path / "run")]) == 2  # train refuses it too


# ---------------------------------------------------------------- lora-ft plan


def test_plan_proposes_a_setting_that_fits(tmp_path, tiny_llama, tiny_data, capsys):
    import json

    from lora_ft.planner import parse_size

    assert parse_size("24GiB") == 24 and parse_size("512MiB") == 0.5 and parse_size("2g") == 2
    recipe = cls_recipe(tmp_path / "r.yaml", tiny_llama, tiny_data, per_device_train_batch_size=16)
    capsys.readouterr()
    assert main(["plan", "--json", "--gpu-memory", "100GiB", str(recipe)]) == 0
    plan = json.loads(capsys.readouterr().out)
    rows = {(r["mode"], r["batch"], r["gradient_checkpointing"]): r for r in plan["rows"]}
    assert rows[("qlora4", 16, False)]["weights_gb"] < rows[("lora", 16, False)]["weights_gb"]
    assert rows[("full", 16, False)]["trainable_state_gb"] > rows[("lora", 16, False)]["trainable_state_gb"]
    assert rows[("lora", 4, False)]["activations_gb"] < rows[("lora", 16, False)]["activations_gb"]
    assert plan["proposal"][-4:] == ["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1"]

    # A budget between the batch-16 and batch-1 estimates: a smaller batch with more accumulation, same effective batch.
    budget = (rows[("lora", 16, False)]["total_gb"] + rows[("lora", 1, False)]["total_gb"]) / 2
    assert main(["plan", "--json", "--gpu-memory", f"{budget}GiB", str(recipe)]) == 0
    got = json.loads(capsys.readouterr().out)["proposal"]
    b, k = int(got[got.index("--per_device_train_batch_size") + 1]), int(got[got.index("--gradient_accumulation_steps") + 1])
    assert b < 16 and b * k == 16
    assert main(["plan", "--gpu-memory", "1KiB", str(recipe)]) == 1
    assert "nothing fits" in capsys.readouterr().out


def test_memory_model_logits_terms():
    """Causal-LM heads run in token tiles (bounded logits), seq2seq materializes them, classifiers have none;
    full fine-tuning's gradients reuse activation memory, its Adam moments do not."""
    from transformers import LlamaConfig

    from lora_ft.memory import estimate, head_kind

    cfg = LlamaConfig(vocab_size=50000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
    act = {k: [estimate(cfg, batch_size=8, seq_len=n, lm_head=head_kind(k), total_params=10**7).activations_gb for n in (256, 1024)]
           for k in ("causal-lm", "seq2seq", "sequence-classification")}
    growth = {k: v[1] - v[0] for k, v in act.items()}
    assert growth["seq2seq"] > 5 * growth["causal-lm"] > 0  # past one tile only the layers' activations grow
    assert growth["causal-lm"] == pytest.approx(growth["sequence-classification"])
    full = estimate(cfg, batch_size=1, seq_len=8, mode="full", dtype_bytes=4, lm_head="none", total_params=10**7)
    assert full.trainable_gb * 2**30 == pytest.approx(10**7 * 12, rel=0.01)  # tiny activations: gradients count whole


def test_activations_are_counted_in_the_precision_the_run_trains_in(monkeypatch):
    """bf16 autocast where lora_ft trains in bf16 (AMX here, forced), fp32 activations on an AVX2-only CPU: twice the
    bytes. The recipe's own bf16 / fp16 wins over the hardware's default, as in train.resolve_hardware."""
    from lora_ft.memory import activation_bytes

    monkeypatch.setenv("LORA_FT_CPU_CAPABILITY", "amx")
    assert activation_bytes({}) == 2 and activation_bytes({"bf16": False}) == 4
    monkeypatch.setenv("LORA_FT_CPU_CAPABILITY", "avx2")
    assert activation_bytes({}) == 4 and activation_bytes({"bf16": True}) == 2 and activation_bytes({"fp16": True}) == 2
