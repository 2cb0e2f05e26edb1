"""`lora-ft export --format onnx` on merged tiny models: BERT and decoder (GPT-2, Llama) classifiers and a T5.

Beyond the export's own verification, each graph is run here with onnxruntime on inputs the export never saw
(other lengths, a padded batch) and compared with the merged torch model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import LABELS
from fixtures_gen import QA, llama_models, tiny_t5, write_jsonl, write_recipe  # noqa: F401  (fixtures by name)
from lora_ft.cli import main

# The legacy (TorchScript) exporter warns about every shape-dependent branch it freezes; the checks below are what
# tell whether the graph generalises.
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")

TEXTS = ["short", "a somewhat longer sentence about the weather and the traffic today, to pad the others",
         "what a great day"]
GEN_FAST = {"max_steps": 2, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "eval_strategy": "no",
            "save_strategy": "no", "report_to": "none", "logging_steps": 1, "disable_tqdm": True, "bf16": False,
            "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 5e-3, "warmup_steps": 0, "seed": 0}


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def export(capsys, folder, out, *extra) -> dict:
    rc, stdout, err = cli(capsys, "export", folder, "--format", "onnx", "--output", out, *extra)
    assert rc == 0, err
    report = json.loads(stdout)
    assert report == json.loads((out / "export_report.json").read_text())
    return report


def session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def merge(run_dir, out):
    assert main(["merge", str(run_dir), "--output", str(out)]) == 0
    return out


# ---------------------------------------------------------------- classification


@pytest.fixture(scope="module", params=["bert", "gpt2", "llama"])
def merged_cls(request, tmp_path_factory):
    run = request.getfixturevalue(f"{request.param}_run").run_dir
    return merge(run, tmp_path_factory.mktemp(f"onnx-{request.param}") / "M")


def test_classifier_exports_and_matches_torch(merged_cls, tmp_path, capsys):
    import torch

    from lora_ft.inference import load_run

    out = tmp_path / "onnx"
    report = export(capsys, merged_cls, out)
    assert report["verified"] is True and report["task"] == "sequence-classification"
    assert report["max_abs_logit_diff"] < 1e-3 and report["argmax_agreement"] == 1.0
    for name in ("model.onnx", "config.json", "tokenizer.json", "lora_ft_recipe.yaml", "merge_report.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["id2label"] == {str(i): n for i, n in enumerate(LABELS)}

    model, tok, _ = load_run(merged_cls)
    sess = session(out / "model.onnx")
    for batch in [[t] for t in TEXTS] + [TEXTS]:  # every length alone, then padded together
        enc = tok(batch, padding=True, return_tensors="np")
        feed = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
        got = sess.run(None, feed)[0]
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
        assert got.shape == (len(batch), len(LABELS))
        assert np.abs(got - ref).max() < 1e-3, batch


def test_inputs_file(bert_run, tmp_path, capsys):
    m = merge(bert_run.run_dir, tmp_path / "M")
    texts = tmp_path / "t.txt"
    texts.write_text("one\ntwo words\nthree words here\n", encoding="utf-8")
    report = export(capsys, m, tmp_path / "onnx", "--inputs", texts)
    assert report["verified"] is True and report["n_inputs"] == 3


# ---------------------------------------------------------------- seq2seq, causal


def gen_run(tmp_path, base, columns, **keys):
    """A merged tiny generative run: train two steps on the QA pairs (in the given columns), merge."""
    rows = [dict(zip(columns, qa)) for qa in QA]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "test.jsonl", rows)
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path=str(base), dataset_name=str(tmp_path / "data"),
                          max_length=64, **{**GEN_FAST, **keys})
    assert main(["train", str(recipe), "--output_dir", str(tmp_path / "run")]) == 0
    return merge(tmp_path / "run", tmp_path / "M")


def test_seq2seq_exports_and_matches_torch(tmp_path, tiny_t5, capsys):
    import torch

    from lora_ft.inference import load_run

    m = gen_run(tmp_path, tiny_t5, ("question", "answer"), task="seq2seq", source_template="question: {question}", target_column="answer",
                max_target_length=16, generation_max_new_tokens=4)
    # Real T5 checkpoints ship dropout 0.1 (the fixture has none): the export must run and verify in eval mode.
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "dropout_rate": 0.1}))
    out = tmp_path / "onnx"
    report = export(capsys, m, out)
    assert report["verified"] is True and report["task"] == "seq2seq" and report["greedy_token_agreement"] == 1.0
    assert report["files"] == ["encoder.onnx", "decoder.onnx"]
    for name in ("encoder.onnx", "decoder.onnx", "config.json", "export_report.json", "lora_ft_recipe.yaml"):
        assert (out / name).is_file(), name

    model, tok, _ = load_run(m)
    model.eval()
    enc, dec = session(out / "encoder.onnx"), session(out / "decoder.onnx")
    e = tok(TEXTS, padding=True, return_tensors="np")
    ids, mask = e["input_ids"].astype(np.int64), e["attention_mask"].astype(np.int64)
    prefix = np.array([[model.config.decoder_start_token_id, 104, 105]] * len(TEXTS), dtype=np.int64)
    h = enc.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    logits = dec.run(None, {"decoder_input_ids": prefix, "encoder_hidden_states": h, "attention_mask": mask})[0]
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    decoder_input_ids=torch.from_numpy(prefix), use_cache=False)
        ref_h = model.get_encoder()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    assert np.abs(h - ref_h.numpy()).max() < 1e-3
    assert logits.shape == tuple(ref.logits.shape) and np.abs(logits - ref.logits.numpy()).max() < 1e-3


def test_causal_lm_is_a_one_line_error(tmp_path, llama_models, capsys):
    m = gen_run(tmp_path, llama_models[0], ("prompt", "completion"), task="causal-lm", max_steps=1)
    rc, out, err = cli(capsys, "export", m, "--format", "onnx", "--output", tmp_path / "onnx")
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("Loading weights")]
    assert rc == 2 and out == "" and len(lines) == 1 and "gguf" in lines[0]
    assert not (tmp_path / "onnx").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".onnx")] == []
