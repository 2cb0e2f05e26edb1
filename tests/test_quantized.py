"""QLoRA (4-bit nf4) and 8-bit bases: train a few steps on CPU with bitsandbytes, then serve from the run dir.

The tiny Llama has hidden size 64 and intermediate size 128: bitsandbytes quantizes in blocks of 64.
"""

from __future__ import annotations

import json

import pytest

from conftest import LABELS, cls_recipe, json_lines, train_in_process
from lora_ft.cli import main
from lora_ft.config import load_run_recipe

MODES = {"4bit": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},  # default compute dtype: bfloat16
         "8bit": {"load_in_8bit": True}}


@pytest.fixture(scope="module", params=list(MODES))
def quantized_run(request, tmp_path_factory, tiny_llama, tiny_data):
    root = tmp_path_factory.mktemp(f"llama-{request.param}")
    recipe = cls_recipe(root / "q.yaml", tiny_llama, tiny_data, max_steps=2, **MODES[request.param])
    return request.param, train_in_process(recipe, root / "run")


def quantized_layer_types(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("bitsandbytes")}


def test_trains_and_writes_a_run_dir(quantized_run):
    mode, run_dir = quantized_run
    assert (run_dir / "adapter_model.safetensors").is_file()
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["global_step"] == 2 and 0.0 <= m["eval_accuracy"] <= 1.0
    saved = load_run_recipe(run_dir).args
    assert (saved.load_in_4bit, saved.load_in_8bit) == (mode == "4bit", mode == "8bit")
    if mode == "4bit":
        assert saved.bnb_4bit_quant_type == "nf4"


def test_served_model_is_quantized_with_a_full_precision_head(quantized_run):
    import torch

    from lora_ft.inference import load_run

    mode, run_dir = quantized_run
    model, _, _ = load_run(run_dir)
    kinds = quantized_layer_types(model)
    assert ("Linear4bit" if mode == "4bit" else "Linear8bitLt") in kinds, kinds
    heads = [p for n, p in model.named_parameters() if "score" in n and "modules_to_save" in n]
    assert heads and all(p.dtype == torch.float32 for p in heads)  # skipped by the quantizer, trained fully


def test_serving_leaves_quantized_weights_as_they_are(quantized_run, monkeypatch):
    """bf16 serving casts full-precision models only: bitsandbytes layers already compute in their compute dtype."""
    from lora_ft.serving.registry import load_models

    monkeypatch.setenv("LORA_FT_CPU_CAPABILITY", "amx")  # auto would cast to bf16 here
    mode, run_dir = quantized_run
    served = load_models([f"q={run_dir}"])
    assert served["q"].group.dtype == "quantized"
    assert ("Linear4bit" if mode == "4bit" else "Linear8bitLt") in quantized_layer_types(served["q"].group.model)


def test_predict_matches_train_time_eval(quantized_run, capsys):
    mode, run_dir = quantized_run
    rows = json_lines((run_dir / "eval_predictions.jsonl").read_text(encoding="utf-8"))
    args = ["predict", str(run_dir)]
    for r in rows:
        args += ["--text", r["text"]]
    capsys.readouterr()
    assert main(args) == 0
    got = json_lines(capsys.readouterr().out)
    assert [g["text"] for g in got] == [r["text"] for r in rows]
    tol = 1e-4  # batch layout differs (padding to 8 at train time, to the longest here): last digits only
    if mode == "4bit":  # training dequantizes into bf16 for a matmul; predict runs bitsandbytes' packed CPU kernel
        tol = 1e-3
    for g, r in zip(got, rows):
        assert list(g["scores"]) == LABELS
        assert g["score"] == pytest.approx(r["score"], abs=tol)
        top2 = sorted(g["scores"].values())[-2:]
        assert g["label"] == r["pred"] or top2[1] - top2[0] < 2 * tol


def test_dora_on_4bit_keeps_a_weight_layout_peft_can_read(tmp_path, tiny_llama, tiny_data):
    """bitsandbytes repacks 4-bit weights for its CPU kernel at the first eval forward; peft's DoRA dequantizes them
    with a function that ignores the packing, so a DoRA run must keep the standard layout (modeling.keep_standard_4bit_layout)."""
    import torch
    from peft.utils.integrations import dequantize_module_weight

    from lora_ft.inference import load_run

    recipe = cls_recipe(tmp_path / "q.yaml", tiny_llama, tiny_data, max_steps=2, use_dora=True, **MODES["4bit"])
    run_dir = train_in_process(recipe, tmp_path / "run")
    model, tok, _ = load_run(run_dir)
    enc = tok(["a short text", "another one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        first = model(**enc).logits
        second = model(**enc).logits  # after bitsandbytes had its chance to repack
    assert torch.equal(first, second)
    import bitsandbytes as bnb

    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))  # the base layer, not peft's wrapper
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        ref = x @ dequantize_module_weight(layer).float().T
        got = layer(x).float()
    assert ((got - ref).norm() / ref.norm()) < 0.05


def test_dora_on_8bit_trains_with_gradient_checkpointing(tmp_path, tiny_llama, tiny_data):
    """peft's 8-bit dequantization replaced the layer's weight with one that had lost its scales; with checkpointing
    the layer's rerun forward then crashed in bitsandbytes (cpu_dora dequantizes from the scales in place)."""
    recipe = cls_recipe(tmp_path / "q.yaml", tiny_llama, tiny_data, max_steps=2, use_dora=True, gradient_checkpointing=True,
                        **MODES["8bit"])
    run_dir = train_in_process(recipe, tmp_path / "run")
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 2
