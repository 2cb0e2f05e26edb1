"""`lora-ft export RUN --format gguf-lora`: a short chat run on tiny random Llama / Qwen2 / GPT-2 models, its adapter
written as a GGUF LoRA adapter; read back, base + adapter must equal the merged weights in llama.cpp's layout, and
(slow, with llama-cpp-python) llama.cpp on base GGUF + adapter gives the merged model's greedy tokens.
"""

from __future__ import annotations

import json

import pytest

from fixtures_gen import write_jsonl, write_recipe
from lora_ft.cli import main
from lora_ft.errors import LoraFtError
from lora_ft.export import gguf_lora as gl
from test_export_gguf import build_arch, build_tiny

QA = [("What color is the sky?", "The sky is blue."), ("Name a fruit.", "A banana."), ("Who wrote Hamlet?", "Shakespeare.")]
# alpha / r = 4 (not the default 2) and rsLoRA on one run: llama.cpp scales by alpha / r, so peft's own scale
# has to be folded into B for the file to compute what peft did.
RUN = {"task": "causal-lm", "max_steps": 8, "per_device_train_batch_size": 3, "eval_strategy": "no",
       "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "bf16": False, "max_length": 64, "lora_r": 8,
       "lora_alpha": 32, "lora_dropout": 0.0, "learning_rate": 2e-2, "warmup_steps": 0, "seed": 0}


def train(root, arch: str, **keys):
    base = build_tiny(root / "base") if arch == "llama" else build_arch(root / "base", arch)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    write_jsonl(root / "data" / "train.jsonl", rows)
    write_jsonl(root / "data" / "test.jsonl", rows)
    recipe = write_recipe(root / "r.yaml", model_name_or_path=str(base), dataset_name=str(root / "data"), **{**RUN, **keys})
    assert main(["train", str(recipe), "--output_dir", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("lora-llama"), "llama", use_rslora=True)


def test_adapter_file_and_read_back(llama_run, tmp_path):
    from gguf import GGUFReader

    r = gl.export_gguf_lora(str(llama_run), str(tmp_path / "a.gguf"), llama_cpp="off")
    assert r["verified"] and r["verification"]["max_rel_weight_diff"] < 1e-5
    rd = GGUFReader(tmp_path / "a.gguf")
    f = {k: rd.fields[k].contents() for k in ("general.type", "general.architecture", "adapter.type", "adapter.lora.alpha")}
    assert f == {"general.type": "adapter", "general.architecture": "llama", "adapter.type": "lora", "adapter.lora.alpha": 32.0}
    ts = {t.name: t for t in rd.tensors}
    # every linear layer of both blocks, as <base tensor>.lora_a / .lora_b, in ggml order (row length first)
    stems = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(ts) == {f"blk.{i}.{s}.weight.lora_{x}" for i in range(2) for s in stems for x in "ab"}
    assert [int(n) for n in ts["blk.0.attn_k.weight.lora_a"].shape] == [64, 8]   # A: (r, in) -> ne [in, r]
    assert [int(n) for n in ts["blk.0.attn_k.weight.lora_b"].shape] == [8, 32]   # B: (out, r) -> ne [r, out]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]


@pytest.mark.parametrize("broken", ["no_row_permutation", "no_scale_fold"])
def test_read_back_catches_a_wrong_adapter(llama_run, tmp_path, monkeypatch, broken):
    """Q/K rows left in HF order, or rsLoRA's scale left to llama.cpp's alpha / r: the read-back refuses both."""
    if broken == "no_row_permutation":
        monkeypatch.setattr(gl, "_b_rows", lambda b, heads: b)
    else:
        monkeypatch.setattr(gl, "_scale_fold", lambda scaling, r, alpha: 1.0)
    with pytest.raises(LoraFtError, match="differs from the merged weights"):
        gl.export_gguf_lora(str(llama_run), str(tmp_path / "a.gguf"), llama_cpp="off")
    assert not (tmp_path / "a.gguf").exists()


def test_refusals_are_one_line(tmp_path, llama_run):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "lora_ft_recipe.yaml").write_text("task: causal-lm\n")
    with pytest.raises(LoraFtError, match="--format gguf"):
        gl.export_gguf_lora(str(merged), str(tmp_path / "a.gguf"), llama_cpp="off")
    dora = tmp_path / "dora"
    dora.mkdir()
    for p in llama_run.iterdir():
        if p.is_file():
            (dora / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LoraFtError, match="DoRA") as e:
        gl.export_gguf_lora(str(dora), str(tmp_path / "a.gguf"), llama_cpp="off")
    assert "\n" not in str(e.value) and not (tmp_path / "a.gguf").exists()


def test_cli_writes_the_adapter(llama_run, tmp_path, capsys):
    assert main(["export", str(llama_run), "--format", "gguf-lora", "--output", str(tmp_path / "a.gguf"), "--llamacpp", "off"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verified"] and report["checked_by"] == ["gguf read-back (base + adapter == merged weights)"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_llamacpp_base_plus_adapter_equals_merged(tmp_path, arch):
    """llama.cpp loads the base's GGUF with lora_path= and reproduces the merged model's greedy tokens."""
    from lora_ft.export import llamacpp

    if llamacpp.version() is None:
        pytest.skip("llama-cpp-python is not importable here (install it with `make llamacpp`; it builds from source)")
    run = train(tmp_path, arch)
    r = gl.export_gguf_lora(str(run), str(tmp_path / "a.gguf"), llama_cpp="require")
    v = r["verification_llamacpp"]
    # greedy tokens equal; llama.cpp may stop earlier on a token it treats as end-of-generation by its text
    # (the tiny tokenizer's <|endoftext|>), which the merged model's generation config does not list
    assert r["verified"] and v["greedy_same_until_llamacpp_stop"] == [True] * 3, v
    assert v["argmax_agreement"] >= 0.98 and v["greedy_step_agreement"] == 1.0
    assert all(x["same_text"] in (True, None) for x in v["chat"]["replies"]), v["chat"]
    assert v["chat"]["template_renders_same"] == [True] * 3
    assert len(r["checked_by"]) == 2 and "llama-cpp-python" in r["checked_by"][1]
