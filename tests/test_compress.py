"""`lora-ft compress` on a merged tiny Llama classifier (hidden 64: bitsandbytes' 4-bit blocks fit), measured on
a tiny CSV: the report, the saved weights (really pruned / really 4-bit, no pruning reparametrisation left),
and that the saved folder serves the numbers the report measured.
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import LABELS
from lora_ft.cli import main

N = 16  # --max-samples: enough rows for a metric, few enough to measure in a blink


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def merged(llama_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "M"
    assert main(["merge", str(llama_run.run_dir), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def eval_csv(tiny_data):
    return tiny_data / "test.csv"


def compress(capsys, merged, eval_csv, method, out):
    rc, stdout, err = cli(capsys, "compress", merged, "--method", method, "--eval-dataset", eval_csv,
                          "--max-samples", N, "--output", out)
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])  # the table, then one JSON line
    assert summary["output"] == str(out)
    report = json.loads((out / "compress_report.json").read_text())
    assert summary["size_ratio"] == pytest.approx(report["size_ratio"])
    return report


def check_report(report, method):
    md = (report["_out"] / "compress_report.md").read_text()
    assert md.startswith(f"| {method} on M |") and "| original |" in md and "| compressed |" in md
    assert report["method"] == method
    for side in ("original", "compressed"):
        r = report[side]
        assert r["metric_name"] == "eval_accuracy" and 0.0 <= r["metric"] <= 1.0
        assert r["eval_samples"] == N and r["latency_ms_per_example"] > 0 and r["size_mb"] > 0
    assert report["metric_delta"] == pytest.approx(report["compressed"]["metric"] - report["original"]["metric"])


def eval_accuracy(capsys, folder, eval_csv) -> float:
    rc, out, err = cli(capsys, "eval", folder, "--dataset_name", eval_csv, "--max_eval_samples", N)
    assert rc == 0, err
    return json.loads(out)["eval_accuracy"]


def saved_weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def compressible(sd) -> dict:
    """The Linear weights compress touches: decoder-layer projections (never the head or the embeddings)."""
    return {k: v for k, v in sd.items() if re.search(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", k)}


@pytest.mark.parametrize("structured", [False, True], ids=["unstructured", "structured"])
def test_prune(merged, eval_csv, tmp_path, capsys, structured):
    method = "prune:0.3" + (":structured" if structured else "")
    out = tmp_path / "P"
    report = compress(capsys, merged, eval_csv, method, out)
    report["_out"] = out
    check_report(report, method)
    shown = re.search(r"sparsity of compressed Linear weights: ([0-9.]+)", (out / "compress_report.md").read_text())
    assert float(shown.group(1)) == pytest.approx(report["sparsity"], abs=1e-3)
    assert report["sparsity"] == pytest.approx(0.3, abs=0.02)

    sd = saved_weights(out)
    assert not [k for k in sd if "weight_orig" in k or "weight_mask" in k]  # the mask was made permanent
    lin = compressible(sd)
    assert len(lin) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    for name, w in lin.items():
        zeros = float((w == 0).float().mean())
        assert zeros == pytest.approx(0.3, abs=0.02), name
        if structured:  # whole output rows are zero, the others untouched
            zero_rows = (w == 0).all(dim=1)
            assert float(zero_rows.float().mean()) == pytest.approx(zeros, abs=1e-6), name
    base = saved_weights(merged)
    for name in ("score.weight", "model.embed_tokens.weight"):  # heads and embeddings are never pruned
        assert sd[name].equal(base[name])
    # The saved folder is the model that was measured.
    assert eval_accuracy(capsys, out, eval_csv) == pytest.approx(report["compressed"]["metric"])


def test_nf4(merged, eval_csv, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "Q"
    report = compress(capsys, merged, eval_csv, "nf4", out)
    report["_out"] = out
    check_report(report, "nf4")
    assert report["size_ratio"] < 0.6 and report["compressed"]["size_mb"] < report["original"]["size_mb"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    sd = saved_weights(out)
    assert any(k.endswith("quant_state.bitsandbytes__nf4") for k in sd)
    assert str(sd["model.layers.0.mlp.up_proj.weight"].dtype) == "torch.uint8"  # packed 4-bit

    model = AutoModelForSequenceClassification.from_pretrained(out)  # a plain transformers reload
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds
    assert type(model.score).__name__ == "Linear"  # the head stays full precision
    assert [model.config.id2label[i] for i in range(3)] == LABELS
    assert eval_accuracy(capsys, out, eval_csv) == pytest.approx(report["compressed"]["metric"])


def test_int8(merged, eval_csv, tmp_path, capsys):
    out = tmp_path / "I"
    report = compress(capsys, merged, eval_csv, "int8", out)
    report["_out"] = out
    check_report(report, "int8")
    assert report["size_ratio"] < 1.0 and "int8_dynamic" in report["note"]


@pytest.mark.parametrize("method", ["int4", "prune:1.5", "prune:0", "prune:0.3:rows", "prune"])
def test_bad_method_is_one_line(merged, eval_csv, tmp_path, capsys, method):
    rc, out, err = cli(capsys, "compress", merged, "--method", method, "--eval-dataset", eval_csv, "--output", tmp_path / "X")
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"lora-ft: error: --method {method}:")
    assert not (tmp_path / "X").exists()


def test_not_a_merged_folder(tmp_path, capsys, eval_csv):
    rc, _, err = cli(capsys, "compress", tmp_path, "--method", "int8", "--eval-dataset", eval_csv)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "lora-ft merge" in err


def test_int8_dynamic_quantizes_the_projections_only(merged):
    import torch

    from lora_ft.compress import int8_dynamic
    from lora_ft.inference import load_run

    model, _, _ = load_run(merged)
    q = int8_dynamic(model)
    layer = q.model.layers[0]
    assert type(layer.mlp.up_proj).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert type(layer.self_attn.q_proj).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert type(q.score) is torch.nn.Linear  # the head stays float


def test_export_bnb4_folder_reloads_with_its_head(merged, tmp_path, capsys):
    """`lora-ft export --format bnb4`: a serialized 4-bit folder that reloads with plain from_pretrained, head intact."""
    out = tmp_path / "bnb4"
    rc, stdout, err = cli(capsys, "export", merged, "--format", "bnb4", "--output", out)
    assert rc == 0, err
    report = json.loads(stdout)
    assert report["verified"] and report["linear4bit_layers"] > 0 and report["label_agreement"] >= 0.5
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert (out / "lora_ft_recipe.yaml").is_file() and (out / "export_report.json").is_file()
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(m.score).__name__ == "Linear" and m.config.id2label[0] == LABELS[0]  # the head stays full precision
    rc, stdout, _ = cli(capsys, "predict", out, "--text", "what a lovely day")
    assert rc == 0 and json.loads(stdout)["label"] in LABELS
