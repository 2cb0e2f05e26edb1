"""Serving speed levers (lora_ft/serving/speed.py), the onnx backend and plain HF model folders, on tiny models:
each lever leaves the served rows equal to the task's own predict, where it can."""

from __future__ import annotations

import asyncio
import itertools
import json

import httpx
import pytest

from fixtures_ner import ner_data, ner_run  # noqa: F401  (fixtures by name)
from lora_ft.cli import main
from lora_ft.errors import LoraFtError
from lora_ft.inference import load_run
from lora_ft.serving import speed as sp
from lora_ft.serving.app import ServeSettings, build_app
from lora_ft.serving.registry import load_models
from lora_ft.tasks import get_task, task_for_architectures

# Different lengths on purpose: length groups must split them and put the answers back in order.
TEXTS = ["meh", "a lovely sunny day at the beach with friends and a cold drink", "the train was late again",
         "ok", "what a wonderful surprise it was to see everyone there after all these years apart", "it is a table"]
FP32 = sp.Speed(dtype="float32")


def post_all(app, route: str, model: str, texts: list) -> list:
    """Every text as its own request, all at once: the batcher joins them."""
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as c:
            rs = await asyncio.gather(*(c.post(route, json={"model": model, "inputs": [t]}) for t in texts))
            assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
            return [r.json()["results"][0] for r in rs]

    return asyncio.run(go())


def alone(path, texts, dtype=None):
    import torch

    model, tok, recipe = load_run(path)
    if dtype is not None:
        model.to(dtype)
    with torch.no_grad():
        return [get_task(recipe.args.task).predict(model, tok, [t], recipe)[0] for t in texts]


def same_rows(got, want, key="label", tol=1e-4):
    assert [g[key] for g in got] == [w[key] for w in want]
    if key == "label":
        assert all(g["score"] == pytest.approx(w["score"], abs=tol) for g, w in zip(got, want))


# ---------------------------------------------------------------- the levers' own logic


def test_length_groups_cover_every_input_once_and_are_optimal():
    lengths = [5, 40, 6, 41, 7, 90]
    for overhead in (0, 10, 50, 10_000):
        runs = sp.length_groups(lengths, overhead)
        assert sorted(i for r in runs for i in r) == list(range(len(lengths)))
        cost = sum(overhead + len(r) * max(lengths[i] for i in r) for r in runs)
        srt = sorted(lengths)  # brute force over every split of the sorted lengths
        best = min(sum(overhead + (b - a) * srt[b - 1] for a, b in zip((0, *cuts), (*cuts, len(srt))))
                   for k in range(len(srt)) for cuts in itertools.combinations(range(1, len(srt)), k))
        assert cost == best
    assert len(sp.length_groups(lengths, 10_000)) == 1  # a forward pass dearer than any padding: one batch
    assert sorted(map(sorted, sp.length_groups(lengths, 10))) == [[0, 2, 4], [1, 3], [5]]


def test_speed_settings_are_checked_and_auto_follows_the_cpu(monkeypatch):
    with pytest.raises(LoraFtError, match="--dtype"):
        sp.Speed(dtype="float16")
    with pytest.raises(LoraFtError, match="--backend"):
        sp.Speed(backend="tensorrt")
    monkeypatch.setenv("LORA_FT_CPU_CAPABILITY", "avx2")  # no native bf16: fp32
    assert sp.resolved_dtype(sp.Speed()) == "float32"
    monkeypatch.setenv("LORA_FT_CPU_CAPABILITY", "amx")
    assert sp.resolved_dtype(sp.Speed()) == "bfloat16"
    assert sp.resolved_dtype(FP32) == "float32"


# ---------------------------------------------------------------- served rows equal predict


def test_fp32_levers_equal_predict(gpt2_run, monkeypatch):
    """inference_mode, length groups (forced to split) and batching: the rows predict gives each text alone."""
    monkeypatch.setattr(sp, "OVERHEAD_TOKENS", 2)
    served = load_models([f"g={gpt2_run.run_dir}"], speed=FP32)
    split = []
    real = sp.length_groups
    monkeypatch.setattr(sp, "length_groups", lambda *a: split.append(real(*a)) or split[-1])
    app = build_app(served, ServeSettings(max_wait_ms=50, speed=FP32))
    got = post_all(app, "/v1/classify", "g", TEXTS)
    assert max(app.state.batchers["g"].batch_sizes) > 1 and any(len(s) > 1 for s in split)
    same_rows(got, alone(gpt2_run.run_dir, TEXTS))
    assert served["g"].group.dtype == "float32"


def test_bf16_casts_once_and_answers_as_predict_on_the_cast_model(llama_run, monkeypatch):
    import torch

    monkeypatch.setenv("LORA_FT_CPU_CAPABILITY", "amx")  # auto means bf16 on any machine here
    unmerged = sp.Speed(group_by_length=False, merge=False)  # predict runs the adapter: the same computation
    served = load_models([f"l={llama_run.run_dir}"], speed=unmerged)
    model = served["l"].group.model
    assert served["l"].group.dtype == "bfloat16"
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.bfloat16}
    c = build_app(served, ServeSettings(speed=unmerged))
    for t in TEXTS:  # one request, one batch: the same computation as predict on the bf16 model
        got = asyncio.run(_one(c, "/v1/classify", "l", t))
        same_rows([got], alone(llama_run.run_dir, [t], torch.bfloat16), tol=0)
    monkeypatch.setenv("LORA_FT_CPU_CAPABILITY", "avx2")  # no native bf16: weights stay fp32
    assert load_models([f"l={llama_run.run_dir}"])["l"].group.dtype == "float32"


def test_a_run_alone_is_merged_at_load_and_runs_on_a_shared_base_are_not(llama_run, gpt2_run):
    from peft import PeftModel

    served = load_models([f"l={llama_run.run_dir}"], speed=FP32)
    assert served["l"].adapter is None and not isinstance(served["l"].group.model, PeftModel)
    assert not any("lora_" in n for n, _ in served["l"].group.model.named_parameters())
    same_rows([asyncio.run(_one(build_app(served, ServeSettings(speed=FP32)), "/v1/classify", "l", t)) for t in TEXTS],
              alone(llama_run.run_dir, TEXTS))  # fp32 merge: predict's labels, scores to 1e-4
    kept = load_models([f"a={gpt2_run.run_dir}", f"b={gpt2_run.run_dir}"], speed=FP32)
    assert kept["a"].group is kept["b"].group and isinstance(kept["a"].group.model, PeftModel)
    assert isinstance(load_models([f"l={llama_run.run_dir}"], speed=sp.Speed(dtype="float32", merge=False))["l"].group.model, PeftModel)


def test_int8_quantizes_the_base_only_and_answers_as_predict_on_that_model(llama_run):
    import torch

    served = load_models([f"l={llama_run.run_dir}"], speed=sp.Speed(dtype="int8", merge=False, group_by_length=False))
    model = served["l"].group.model
    assert served["l"].group.dtype == "int8"
    int8 = {n for n, mod in model.named_modules() if isinstance(mod, torch.ao.nn.quantized.dynamic.Linear)}
    assert int8 and all(n.endswith("base_layer") for n in int8), int8  # the base's projections, inside peft's wrappers
    fp32 = {n for n, mod in model.named_modules() if type(mod) is torch.nn.Linear}
    assert any(".lora_A." in n for n in fp32) and any("modules_to_save" in n for n in fp32)  # adapters and the head: fp32
    c = build_app(served, ServeSettings(speed=sp.Speed(dtype="int8", merge=False, group_by_length=False)))
    want = get_task(served["l"].task).predict(model, served["l"].tok, TEXTS, served["l"].recipe, batch_size=1)
    got = [asyncio.run(_one(c, "/v1/classify", "l", t)) for t in TEXTS]
    same_rows(got, want, tol=1e-6)
    # Lossy but close: the fp32 model's probabilities within a few hundredths on this tiny random model.
    ref = alone(llama_run.run_dir, TEXTS)
    assert max(abs(g["scores"][k] - r["scores"][k]) for g, r in zip(got, ref) for k in r["scores"]) < 0.05


def test_int8_refuses_what_it_cannot_quantize(gpt2_run):
    import torch

    dora = torch.nn.Module()
    dora.lora_magnitude_vector = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(LoraFtError, match="DoRA"):
        sp.quantize_int8(dora)
    with pytest.raises(LoraFtError, match="no Linear layer"):  # GPT-2: Conv1D projections, 32 wide
        load_models([f"g={gpt2_run.run_dir}"], speed=sp.Speed(dtype="int8"))


def test_int8_on_a_merged_run_quantizes_every_wide_linear(llama_run):
    import torch

    served = load_models([f"l={llama_run.run_dir}"], speed=sp.Speed(dtype="int8"))
    model = served["l"].group.model
    qtype = torch.ao.nn.quantized.dynamic.Linear
    assert served["l"].group.dtype == "int8" and any(isinstance(m, qtype) for m in model.modules())
    assert type(model.score) is torch.nn.Linear  # the head, 3 labels wide, decides the label: fp32


async def _one(app, route, model, text):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as c:
        r = await c.post(route, json={"model": model, "inputs": [text]})
        assert r.status_code == 200, r.text
        return r.json()["results"][0]


def test_token_classification_gets_the_same_levers(ner_run, monkeypatch):  # noqa: F811
    monkeypatch.setattr(sp, "OVERHEAD_TOKENS", 2)
    served = load_models([f"ner={ner_run}"], speed=FP32)
    got = post_all(build_app(served, ServeSettings(max_wait_ms=50, speed=FP32)), "/v1/token-classify", "ner", TEXTS)
    want = alone(ner_run, TEXTS)
    assert [[(e["entity_group"], e["start"], e["end"]) for e in g["entities"]] for g in got] == \
           [[(e["entity_group"], e["start"], e["end"]) for e in w["entities"]] for w in want]


# ---------------------------------------------------------------- the onnx backend


@pytest.fixture(scope="module")
def merged(gpt2_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("speed-merged") / "M"
    assert main(["merge", str(gpt2_run.run_dir), "--output", str(out)]) == 0
    return out


def test_onnx_backend_equals_predict_on_the_merged_model(merged, tmp_path):
    onnx = sp.Speed(backend="onnx", dtype="float32")
    want = alone(merged, TEXTS)
    served = load_models([f"m={merged}"], speed=onnx)  # a merged folder: exported and verified at load
    assert type(served["m"].group.model).__name__ == "OnnxModel"
    same_rows(post_all(build_app(served, ServeSettings(max_wait_ms=50, speed=onnx)), "/v1/classify", "m", TEXTS), want)
    assert main(["export", str(merged), "--format", "onnx", "--output", str(tmp_path / "x")]) == 0
    served = load_models([f"x={tmp_path / 'x'}"], speed=onnx)  # an export folder: served as it is
    same_rows(post_all(build_app(served, ServeSettings(speed=onnx)), "/v1/classify", "x", TEXTS), want)


def test_onnx_int8_quantizes_the_graph_and_stays_close(merged, llama_run, tmp_path):
    import onnx

    with pytest.raises(LoraFtError, match="no MatMul"):  # GPT-2's Conv1D layers export as Gemm, 32 wide
        load_models([f"m={merged}"], speed=sp.Speed(backend="onnx", dtype="int8"))
    assert main(["merge", str(llama_run.run_dir), "--output", str(tmp_path / "L")]) == 0
    merged = tmp_path / "L"  # the tiny Llama's projections: MatMuls 64 wide
    served = load_models([f"m={merged}"], speed=sp.Speed(backend="onnx", dtype="int8"))
    model = served["m"].group.model
    assert served["m"].group.dtype == "int8"
    graph = onnx.load(model.graph_path)
    ops = {n.op_type for n in graph.graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, ops
    got = post_all(build_app(served, ServeSettings(speed=sp.Speed(backend="onnx", dtype="int8"))), "/v1/classify", "m", TEXTS)
    ref = alone(merged, TEXTS)
    assert max(abs(g["scores"][k] - r["scores"][k]) for g, r in zip(got, ref) for k in r["scores"]) < 0.05


def test_onnx_backend_refuses_adapters_and_unverified_exports(gpt2_run, merged, tmp_path):
    with pytest.raises(LoraFtError, match="merge it first"):
        load_models([str(gpt2_run.run_dir)], speed=sp.Speed(backend="onnx"))
    assert main(["export", str(merged), "--format", "onnx", "--output", str(tmp_path / "x")]) == 0
    report = tmp_path / "x" / "export_report.json"
    report.write_text(json.dumps({**json.loads(report.read_text()), "verified": False}))
    with pytest.raises(LoraFtError, match="no verified export_report.json"):
        load_models([str(tmp_path / "x")], speed=sp.Speed(backend="onnx"))


# ---------------------------------------------------------------- plain HF model folders


@pytest.fixture(scope="module")
def plain_classifier(tiny_llama, tmp_path_factory):
    """A HF folder with no lora_ft_recipe.yaml: a classifier trained elsewhere, labels in its config."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("plain") / "clf"
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.pad_token = tok.eos_token
    m = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2, id2label={0: "no", 1: "yes"},
                                                           label2id={"no": 0, "yes": 1}, pad_token_id=tok.pad_token_id)
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_plain_folder_is_served_as_its_architecture_says(plain_classifier, tiny_gpt2, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    served = load_models([f"p={plain_classifier}"], speed=FP32)
    assert served["p"].task == get_task(served["p"].task).NAME and "/v1/classify" in get_task(served["p"].task).SERVE_ROUTES
    got = post_all(build_app(served, ServeSettings(speed=FP32)), "/v1/classify", "p", TEXTS)
    model = AutoModelForSequenceClassification.from_pretrained(plain_classifier).eval()
    tok = AutoTokenizer.from_pretrained(plain_classifier)
    with torch.no_grad():
        want = [model.config.id2label[int(model(**tok([t], return_tensors="pt")).logits.argmax())] for t in TEXTS]
    assert [g["label"] for g in got] == want
    lm = tmp_path / "lm"  # a base causal LM (GPT2LMHeadModel): served for generation
    AutoModelForCausalLM.from_pretrained(tiny_gpt2).save_pretrained(lm)
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(lm)
    served = load_models([f"lm={lm}"])
    assert "/v1/generate" in get_task(served["lm"].task).SERVE_ROUTES
    from fastapi.testclient import TestClient

    c = TestClient(build_app(served), base_url="http://localhost")
    r = c.post("/v1/generate", json={"model": "lm", "prompt": "hello", "max_new_tokens": 3})
    assert r.status_code == 200 and "completion" in r.json()["results"][0]


def test_plain_folder_task_from_the_flag_or_a_clear_error(plain_classifier, tmp_path, capsys):
    cfg = json.loads((plain_classifier / "config.json").read_text())
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in plain_classifier.iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    (odd / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForSomethingElse"]}))
    assert task_for_architectures(["LlamaForSomethingElse"]) is None
    assert main(["serve", str(odd)]) == 2  # one line, no traceback, before any server starts
    err = capsys.readouterr().err
    assert "pass --task" in err and "Traceback" not in err
    served = load_models([str(odd)], task=task_for_architectures(cfg["architectures"]))
    assert served["odd"].task == task_for_architectures(cfg["architectures"])
    with pytest.raises(SystemExit) as e:  # argparse: not a choice
        main(["serve", str(odd), "--dtype", "float16"])
    assert e.value.code == 2 and "--dtype" in capsys.readouterr().err


def test_merge_at_load_never_folds_into_4bit_weights():
    """peft's merge into a 4-bit base re-quantizes W + BA: a changed model, so such runs keep their adapter."""
    import torch

    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
    four_bit = torch.nn.Sequential(q.to("cpu"))
    assert sp.bnb_quantized(four_bit) and not sp.mergeable(four_bit, sp.Speed())
    plain = torch.nn.Sequential(torch.nn.Linear(64, 64))
    assert sp.mergeable(plain, sp.Speed()) and not sp.mergeable(plain, sp.Speed(merge=False))
