"""`lora-ft merge`: adapter + full-precision base -> one plain model folder, verified before it is kept.

Tiny runs (a few steps) go through `lora_ft.cli.main` in this process. The merged folder must serve exactly like
the run (`predict` / `generate` on both agree), hold no adapter or quantization leftovers, and a failed
verification must leave nothing behind.
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import LABELS, cls_recipe, json_lines, train_in_process
from fixtures_gen import QA, llama_models, tiny_t5, write_jsonl, write_recipe  # noqa: F401  (fixtures by name)
from lora_ft.cli import main

DECODERS = ("gpt2", "llama")
HEADS = {"bert": "classifier.weight", "gpt2": "score.weight", "llama": "score.weight"}
GEN_FAST = {"max_steps": 4, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "eval_strategy": "no",
            "save_strategy": "no", "report_to": "none", "logging_steps": 1, "disable_tqdm": True, "bf16": False,
            "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 5e-3, "warmup_steps": 0, "seed": 0}


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def merge(run_dir, out, *extra) -> int:
    return main(["merge", str(run_dir), "--output", str(out), *map(str, extra)])


def report_of(folder) -> dict:
    return json.loads((folder / "merge_report.json").read_text())


def tensors(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def messages(err: str) -> list[str]:
    """stderr lines, less transformers' "Loading weights" progress bar (cli.py leaves it on; it is not ours)."""
    return [ln for ln in re.split(r"[\r\n]+", err) if ln.strip() and not ln.startswith("Loading weights")]


def leftovers(parent, name) -> list[str]:
    """Hidden temp folders that an atomic write left next to its target."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}-")]


def assert_plain_weights(folder, dtype="float32"):
    """Merged weights: plain floating tensors under the base model's own names, nothing of peft or bitsandbytes."""
    sd = tensors(folder)
    bad = [k for k in sd if any(s in k for s in ("lora_", "base_model.model", "modules_to_save", "original_module",
                                                 "base_layer", "absmax", "quant_map", "quant_state", "nested_"))]
    assert not bad, bad[:5]
    assert {str(t.dtype) for t in sd.values()} == {f"torch.{dtype}"}
    assert not (folder / "adapter_config.json").exists() and not (folder / "adapter_model.safetensors").exists()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    return sd


# ---------------------------------------------------------------- classification: BERT, GPT-2, Llama


@pytest.fixture(scope="module", params=["bert", "gpt2", "llama"])
def merged_cls(request, tmp_path_factory):
    run = request.getfixturevalue(f"{request.param}_run").run_dir
    out = tmp_path_factory.mktemp(f"merged-{request.param}") / "M"
    assert merge(run, out) == 0
    return request.param, run, out


def test_merged_folder_layout_and_report(merged_cls):
    from transformers import AutoTokenizer

    arch, run, m = merged_cls
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "lora_ft_recipe.yaml",
                 "merge_report.json"):
        assert (m / name).is_file(), name
    cfg = json.loads((m / "config.json").read_text())
    assert cfg["id2label"] == {str(i): n for i, n in enumerate(LABELS)}
    assert cfg["label2id"] == {n: i for i, n in enumerate(LABELS)}
    if arch in DECODERS:  # the classifier pools the last non-pad token: without pad_token_id it cannot batch
        tok = AutoTokenizer.from_pretrained(m)
        assert cfg["pad_token_id"] is not None and cfg["pad_token_id"] == tok.pad_token_id
    assert (m / "lora_ft_recipe.yaml").read_text() == (run / "lora_ft_recipe.yaml").read_text()
    sd = assert_plain_weights(m)
    assert HEADS[arch] in sd  # the trained head, saved under the plain name

    r = report_of(m)
    n_eval = len(json_lines((run / "eval_predictions.jsonl").read_text()))
    assert r["status"] == "ok" and r["problems"] == [] and r["dtype"] == "float32" and r["n_inputs"] == n_eval
    check, tol = r["adapter_vs_merged"], r["tolerance"]
    assert check["max_abs_logit_diff"] <= tol["max_abs_logit_diff"] and tol["max_abs_logit_diff"] < 2e-3
    assert check["argmax_agreement"] == 1.0 == tol["argmax_agreement"]
    assert r["metric"]["name"] == "accuracy" and r["metric"]["adapter"] == r["metric"]["merged"]
    assert r["trained_quantized"] is False and "trained_quantized_vs_merged" not in r


def test_predict_on_merged_equals_predict_on_run(merged_cls, capsys):
    """Same labels, same probabilities: the trained head (modules_to_save) survived the merge."""
    _, run, m = merged_cls
    texts = [r["text"] for r in json_lines((run / "eval_predictions.jsonl").read_text())][:8]
    texts.append("a much longer text, so that the batch is padded and the pad token matters for decoder classifiers")
    args = [x for t in texts for x in ("--text", t)]
    rc, out_run, _ = cli(capsys, "predict", run, *args)
    rc_m, out_m, _ = cli(capsys, "predict", m, *args)
    assert rc == rc_m == 0
    a, b = json_lines(out_run), json_lines(out_m)
    assert len(a) == len(b) == len(texts)
    for x, y in zip(a, b):
        assert x["label"] == y["label"]
        assert list(x["scores"]) == list(y["scores"]) == LABELS
        for k in LABELS:
            assert x["scores"][k] == pytest.approx(y["scores"][k], abs=1e-4)


def test_second_merge_is_a_no_op(merged_cls, capsys):
    _, run, m = merged_cls
    before = (m / "model.safetensors").stat().st_mtime_ns
    rc, out, err = cli(capsys, "merge", run, "--output", m)
    assert rc == 0, err
    assert json.loads(out)["status"] == "up to date (no-op)"
    assert (m / "model.safetensors").stat().st_mtime_ns == before


# ---------------------------------------------------------------- options and failures (BERT: cheapest)


def test_bfloat16_merge(bert_run, tmp_path):
    out = tmp_path / "M-bf16"
    assert merge(bert_run.run_dir, out, "--dtype", "bfloat16") == 0
    assert_plain_weights(out, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    r = report_of(out)
    assert r["status"] == "ok" and r["dtype"] == "bfloat16" and r["adapter_vs_merged"]["argmax_agreement"] >= 0.97


@pytest.mark.parametrize("n_runs", [1, 2])
def test_unknown_dtype_is_one_line(bert_run, tmp_path, capsys, n_runs):
    runs = [bert_run.run_dir] * n_runs  # two: the multi-adapter path checks the dtype before loading too
    rc, out, err = cli(capsys, "merge", *runs, "--output", tmp_path / "M", "--dtype", "int3")
    assert rc == 2 and out == "" and len(messages(err)) == 1 and "--dtype int3" in err
    assert not (tmp_path / "M").exists()


def impossible_tolerance(monkeypatch):
    import lora_ft.merge

    # atol -1: every |diff| >= 0 exceeds it, so verification always fails.
    monkeypatch.setattr(lora_ft.merge, "TOLERANCE", {k: (-1.0, 0.0, 1.0) for k in lora_ft.merge.TOLERANCE})


def test_failed_verification_writes_nothing_and_force_keeps_it(bert_run, tmp_path, capsys, monkeypatch):
    impossible_tolerance(monkeypatch)
    out = tmp_path / "M"
    rc, stdout, err = cli(capsys, "merge", bert_run.run_dir, "--output", out)
    assert rc == 1 and stdout == ""
    assert len(messages(err)) == 1 and "verification failed" in err and "--force" in err
    assert not out.exists() and leftovers(tmp_path, "M") == []  # nothing half-written

    rc, stdout, err = cli(capsys, "merge", bert_run.run_dir, "--output", out, "--force")
    assert rc == 0, err
    assert json.loads(stdout)["status"] == "forced"
    r = report_of(out)
    assert r["status"] == "forced" and r["problems"] and "max |logit diff|" in r["problems"][0]
    assert (out / "model.safetensors").is_file() and leftovers(tmp_path, "M") == []

    # The same inputs again without --force: a forced model is not "up to date", it fails again, and the kept
    # folder is left as it was.
    before = (out / "model.safetensors").stat().st_mtime_ns
    rc, stdout, err = cli(capsys, "merge", bert_run.run_dir, "--output", out)
    assert rc == 1 and "verification failed" in err
    assert (out / "model.safetensors").stat().st_mtime_ns == before and report_of(out)["status"] == "forced"


def test_inputs_file_and_replacing_an_older_merge(bert_run, tmp_path, capsys):
    out = tmp_path / "M"
    assert merge(bert_run.run_dir, out) == 0
    texts = tmp_path / "texts.txt"
    texts.write_text("first text\n\nsecond text, a little longer\nthird\n", encoding="utf-8")
    rc, stdout, err = cli(capsys, "merge", bert_run.run_dir, "--output", out, "--inputs", texts)
    assert rc == 0, err
    assert json.loads(stdout)["status"] == "ok"  # other inputs: verified again, not a no-op
    r = report_of(out)
    assert r["n_inputs"] == 3 and r["metric"]["adapter"] is None  # user texts carry no references
    assert sorted(p.name for p in tmp_path.iterdir()) == ["M", "texts.txt"]  # the old folder was swapped out whole


def test_full_finetune_run_is_refused(tmp_path, tiny_bert, tiny_data, capsys):
    run = train_in_process(cls_recipe(tmp_path / "full.yaml", tiny_bert, tiny_data, use_peft=False, max_steps=1),
                           tmp_path / "full")
    rc, out, err = cli(capsys, "merge", run, "--output", tmp_path / "M")
    assert rc == 2 and out == ""
    assert len(messages(err)) == 1 and "use_peft: false" in err
    assert not (tmp_path / "M").exists()


def test_qlora_run_merges_into_a_full_precision_base(tmp_path, tiny_llama, tiny_data, capsys):
    recipe = cls_recipe(tmp_path / "q.yaml", tiny_llama, tiny_data, max_steps=2, load_in_4bit=True,
                        bnb_4bit_quant_type="nf4")
    run = train_in_process(recipe, tmp_path / "run")
    out = tmp_path / "M"
    assert merge(run, out) == 0
    sd = assert_plain_weights(out)
    # Full precision: the adapted projections hold one float per weight, not packed 4-bit bytes.
    assert sd["model.layers.0.mlp.up_proj.weight"].shape == (128, 64)
    r = report_of(out)
    assert r["trained_quantized"] is True and r["status"] == "ok"
    q = r["trained_quantized_vs_merged"]
    assert {"max_abs_logit_diff", "argmax_agreement"} <= set(q) and 0.0 <= q["argmax_agreement"] <= 1.0
    assert q["max_abs_logit_diff"] > r["adapter_vs_merged"]["max_abs_logit_diff"]  # really compared with the 4-bit model
    assert r["metric"]["trained_quantized"] is not None
    rc, stdout, _ = cli(capsys, "predict", out, "--text", "what a great day")
    assert rc == 0 and json_lines(stdout)[0]["label"] in LABELS


# ---------------------------------------------------------------- generative runs: causal chat Llama, T5


def generate(capsys, folder, prompts, n=8) -> list[str]:
    rc, out, err = cli(capsys, "generate", folder, "--max_new_tokens", n, *[x for p in prompts for x in ("--prompt", p)])
    assert rc == 0, err
    return [o["completion"] for o in json_lines(out)]


def test_causal_chat_run_merges(tmp_path, llama_models, capsys):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "test.jsonl", rows)
    recipe = write_recipe(tmp_path / "chat.yaml", model_name_or_path=str(llama_models[1]), task="causal-lm",
                          dataset_name=str(tmp_path / "data"), max_length=64, **GEN_FAST)
    run = train_in_process(recipe, tmp_path / "run")
    out = tmp_path / "M"
    assert merge(run, out) == 0
    assert_plain_weights(out)
    assert (out / "generation_config.json").is_file()
    r = report_of(out)
    assert r["task"] == "causal-lm" and r["status"] == "ok" and r["n_inputs"] >= 1
    assert r["adapter_vs_merged"]["argmax_agreement"] == 1.0
    from transformers import AutoTokenizer

    # serving renders prompts with the run's chat template: the merged folder must carry it
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(run).chat_template
    prompts = [q for q, _ in QA[:2]]
    assert generate(capsys, out, prompts) == generate(capsys, run, prompts)
    # The same recipe re-run into the run dir replaces its generations log: merge verifies on this run's rows only.
    rows = (run / "eval_generations.jsonl").read_text().splitlines()
    train_in_process(recipe, run)
    assert len((run / "eval_generations.jsonl").read_text().splitlines()) == len(rows)


def test_seq2seq_run_merges(tmp_path, tiny_t5, capsys):
    rows = [{"question": q, "answer": a.split()[-1].strip(".")} for q, a in QA]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "test.jsonl", rows)
    recipe = write_recipe(tmp_path / "t5.yaml", model_name_or_path=str(tiny_t5), task="seq2seq",
                          dataset_name=str(tmp_path / "data"), source_template="question: {question}",
                          target_column="answer", max_length=64, max_target_length=8, generation_max_new_tokens=4,
                          **GEN_FAST)
    run = train_in_process(recipe, tmp_path / "run")
    out = tmp_path / "M"
    assert merge(run, out) == 0
    assert_plain_weights(out)
    r = report_of(out)
    assert r["task"] == "seq2seq" and r["status"] == "ok" and r["n_inputs"] == len(QA)
    assert r["adapter_vs_merged"]["argmax_agreement"] == 1.0
    prompts = [f"question: {q}" for q, _ in QA[:2]]
    assert generate(capsys, out, prompts) == generate(capsys, run, prompts)


def test_merge_verifies_classifiers_on_the_inputs_predict_sees(tmp_path, tiny_gpt2, tiny_data):
    """Issue 19's bug: merge scored the raw eval texts, while training and predict apply source_template and the
    cleaning options. The verification logits must be exactly predict's, and the reported accuracy predict's."""
    import torch

    from lora_ft import merge as merge_mod
    from lora_ft.inference import load_run
    from lora_ft.tasks.classification import predict

    recipe = cls_recipe(tmp_path / "tmpl.yaml", tiny_gpt2, tiny_data, max_steps=3, source_template="Text: {text}\nLabel:",
                        clean_lowercase=True)
    run_dir = train_in_process(recipe, tmp_path / "run")
    model, tok, saved = load_run(run_dir)
    texts, refs = merge_mod.verification_inputs(run_dir, saved.args.task, None)
    probs = torch.stack(merge_mod._logits(model, tok, texts, saved.args)).softmax(-1)
    rows = predict(model, tok, texts, saved)
    want = torch.tensor([[r["scores"][n] for n in LABELS] for r in rows])
    assert torch.allclose(probs, want, atol=1e-5)
    raw = torch.stack([model(**tok([t], return_tensors="pt")).logits[0] for t in texts]).softmax(-1)
    assert not torch.allclose(raw, want, atol=1e-3)  # the raw texts really are other inputs

    assert merge(run_dir, tmp_path / "merged") == 0
    accuracy = sum(r["label"] == y for r, y in zip(rows, refs)) / len(refs)
    assert report_of(tmp_path / "merged")["metric"] == {"name": "accuracy", "adapter": pytest.approx(accuracy),
                                                         "merged": pytest.approx(accuracy)}
