"""`lora-ft serve`: endpoints on tiny models, shared bases, dynamic batching, limits and errors, the openai client."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from conftest import cls_recipe, train_in_process
from fixtures_gen import QA, llama_models  # noqa: F401  (fixture used by name)
from lora_ft.cli import main
from lora_ft.inference import generate_texts, load_run
from lora_ft.tasks.classification import predict as classify
from lora_ft.serving.app import ServeSettings, build_app
from lora_ft.serving.registry import load_models
from lora_ft.serving.speed import Speed
from test_causal_lm import chat_rows, data_dir, train_run

TEXTS = ["a lovely sunny day", "the train was late again", "it is a table", "what a wonderful surprise", "meh"]


@pytest.fixture(scope="module")
def second_llama_run(tmp_path_factory, tiny_llama, tiny_data):
    """Another classifier on the same tiny Llama base: its adapter shares the base with llama_run's."""
    root = tmp_path_factory.mktemp("serve-llama2")
    recipe = cls_recipe(root / "r.yaml", tiny_llama, tiny_data, max_steps=3, learning_rate=5e-2, seed=3)
    return train_in_process(recipe, root / "second")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, llama_models):  # noqa: F811
    root = tmp_path_factory.mktemp("serve-chat")
    return train_run(root, "chat", llama_models[1], data_dir(root / "data", chat_rows()))


@pytest.fixture(scope="module")
def served(llama_run, second_llama_run, gpt2_run, chat_model):
    # fp32 weights, so scores equal fp32 predict's to 1e-4 (the other levers stay on; bf16: test_serve_speed.py)
    return load_models([str(llama_run.run_dir), f"other={second_llama_run}", f"gpt2={gpt2_run.run_dir}", f"chat={chat_model}"],
                       speed=Speed(dtype="float32"))


def client(served, **settings):
    from fastapi.testclient import TestClient

    # base_url: the Host guard answers loopback names only on a loopback bind (TestClient's default is "testserver")
    return TestClient(build_app(served, ServeSettings(**settings)), raise_server_exceptions=False, base_url="http://localhost")


def test_models_list_names_and_shared_base(served, llama_run):
    c = client(served)
    assert c.get("/health").json() == {"status": "ok", "models": 4}
    body = c.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [llama_run.run_dir.name, "other", "gpt2", "chat"]
    # Two adapters on one tiny-Llama base: one model object; GPT-2 has its own.
    a, b, g = served[llama_run.run_dir.name], served["other"], served["gpt2"]
    assert a.group is b.group and a.group is not g.group and a.adapter != b.adapter


@pytest.mark.parametrize("name", ["first", "other", "gpt2"])
def test_classify_equals_predict(served, llama_run, name):
    """Per adapter, after the other adapter ran on the shared base: the labels `lora-ft predict` gives."""
    name = llama_run.run_dir.name if name == "first" else name
    c = client(served)
    for other in served:  # switch the shared base around first
        if served[other].task == "sequence-classification":
            c.post("/v1/classify", json={"model": other, "inputs": TEXTS[:1]})
    r = c.post("/v1/classify", json={"model": name, "inputs": TEXTS})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    model, tok, recipe = load_run(served[name].path)
    want = classify(model, tok, TEXTS, recipe)
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert all(g["score"] == pytest.approx(w["score"], abs=1e-4) for g, w in zip(got, want))
    assert set(got[0]["scores"]) == set(recipe.args.labels)


def test_adapters_differ_on_the_shared_base(served, llama_run):
    c = client(served)
    one = c.post("/v1/classify", json={"model": llama_run.run_dir.name, "inputs": TEXTS}).json()["results"]
    two = c.post("/v1/classify", json={"model": "other", "inputs": TEXTS}).json()["results"]
    assert [r["scores"] for r in one] != [r["scores"] for r in two]


def test_concurrent_requests_are_batched(served):
    """32 one-text requests at once become a few forward passes, with the answers each would get alone."""
    app = build_app(served, ServeSettings(max_batch_size=32, max_wait_ms=50))
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(32)]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as c:
            rs = await asyncio.gather(*(c.post("/v1/classify", json={"model": "gpt2", "inputs": t}) for t in texts))
            return [r.json()["results"][0] for r in rs]

    got = asyncio.run(go())
    sizes = app.state.batchers["gpt2"].batch_sizes
    assert sum(sizes) == 32 and max(sizes) > 1
    model, tok, recipe = load_run(served["gpt2"].path)
    alone = [classify(model, tok, [t], recipe)[0] for t in texts]
    assert [g["label"] for g in got] == [a["label"] for a in alone]
    assert all(g["score"] == pytest.approx(a["score"], abs=1e-4) for g, a in zip(got, alone))


def test_generate_equals_cli_generate(served, chat_model):
    c = client(served)
    prompts = [q for q, _ in QA]
    got = c.post("/v1/generate", json={"model": "chat", "prompt": prompts, "max_new_tokens": 24}).json()["results"]
    model, tok, recipe = load_run(chat_model)
    want = generate_texts(model, tok, prompts, 24, chat=True, max_length=recipe.args.max_length)
    assert [g["completion"] for g in got] == [w["completion"] for w in want] == [a for _, a in QA]
    assert all(g["stopped"] for g in got)


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/classify", {"model": "nope", "inputs": ["x"]}, 404, "not served"),
    ("/v1/classify", {"model": "../../etc/passwd", "inputs": ["x"]}, 404, "not served"),
    ("/v1/classify", {"model": "gpt2"}, 422, "inputs"),
    ("/v1/classify", {"model": "gpt2", "inputs": [1, 2]}, 422, "string"),
    ("/v1/classify", {"model": "gpt2", "inputs": ["x"], "extra": 1}, 422, "extra"),
    ("/v1/classify", {"model": "gpt2", "inputs": []}, 422, "no inputs"),
    ("/v1/classify", {"model": "chat", "inputs": ["x"]}, 400, "causal-lm model"),
    ("/v1/generate", {"model": "gpt2", "prompt": "x"}, 400, "sequence-classification"),
    ("/v1/generate", {"model": "chat", "prompt": "x", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ("/v1/classify", {"model": "gpt2", "inputs": ["x"] * 9}, 413, "limit is 8"),
    ("/v1/classify", {"model": "gpt2", "inputs": ["x" * 101]}, 413, "101 characters"),
    ("/v1/generate", {"model": "chat", "prompt": "x", "max_new_tokens": 999}, 413, "limit"),
    ("/v1/chat/completions", {"model": "chat", "messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "robot", "content": "x"}]}, 422, "role"),
])
def test_bad_requests(served, path, body, status, words):
    c = client(served, max_inputs=8, max_input_chars=100, max_new_tokens=64)
    r = c.post(path, json=body)
    assert r.status_code == status, r.text
    assert words in r.text
    assert c.post("/v1/classify", json={"model": "gpt2", "inputs": ["still up"]}).status_code == 200


def test_body_limit(served):
    c = client(served, max_body_bytes=200)
    r = c.post("/v1/classify", content=json.dumps({"model": "gpt2", "inputs": ["x" * 300]}), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "200 bytes" in r.text

    def chunks():  # no Content-Length: the limit is counted as the body streams in
        yield b'{"model": "gpt2", "inputs": ["'
        for _ in range(10):
            yield b"x" * 50
        yield b'"]}'

    r = c.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_api_key(served):
    c = client(served, api_key="s3cret")
    assert c.get("/health").status_code == 200  # liveness stays open
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/metrics").status_code == 401


def test_failing_request_leaves_the_server_up(served, monkeypatch):
    import lora_ft.tasks.classification as inference

    c = client(served)
    real = inference.predict
    monkeypatch.setattr(inference, "predict", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    r = c.post("/v1/classify", json={"model": "gpt2", "inputs": ["x"]})
    assert r.status_code == 500 and "boom" not in r.text  # the exception's text goes to the log only
    assert r.json()["error"]["message"] == "internal error; the server log has the details"
    monkeypatch.setattr(inference, "predict", real)
    assert c.post("/v1/classify", json={"model": "gpt2", "inputs": ["x"]}).status_code == 200


def test_timeout_answers_504(served, monkeypatch):
    import lora_ft.tasks.classification as inference

    real = inference.predict
    monkeypatch.setattr(inference, "predict", lambda *a, **k: (time.sleep(0.5), real(*a, **k))[1])
    r = client(served, timeout_s=0.05).post("/v1/classify", json={"model": "gpt2", "inputs": ["x"]})
    assert r.status_code == 504


def test_metrics_count_requests(served):
    c = client(served)
    c.post("/v1/classify", json={"model": "gpt2", "inputs": ["x"]})
    text = c.get("/metrics").text
    assert 'lora_ft_requests_total{endpoint="/v1/classify",model="gpt2",status="200"}' in text
    assert "lora_ft_batch_size_bucket" in text


# ---------------------------------------------------------------- a real server and the openai client


@pytest.fixture(scope="module")
def live_server(served):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(uvicorn.Config(build_app(served, ServeSettings(api_key="k")), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)


def test_openai_client_chat(live_server):
    from openai import OpenAI

    oa = OpenAI(base_url=live_server, api_key="k", max_retries=0)
    assert "chat" in [m.id for m in oa.models.list().data]
    for q, a in QA:
        r = oa.chat.completions.create(model="chat", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24)
        assert r.choices[0].message.content == a and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    q, a = QA[0]
    stream = oa.chat.completions.create(model="chat", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == a
    assert chunks[-1].choices[0].finish_reason == "stop"
    r = oa.chat.completions.create(model="chat", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=2)
    assert r.choices[0].finish_reason == "length"


def test_openai_client_errors(live_server):
    import openai

    oa = openai.OpenAI(base_url=live_server, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        oa.models.list()
    oa = openai.OpenAI(base_url=live_server, api_key="k", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):  # a classifier has no chat
        oa.chat.completions.create(model="gpt2", messages=[{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------- the command


def test_serve_refuses_bad_specs_before_loading(tmp_path, capsys, gpt2_run):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert main(["serve", f"a={gpt2_run.run_dir}", f"a={gpt2_run.run_dir}"]) == 2
    assert "two models named 'a'" in capsys.readouterr().err
    assert main(["serve", f"bad name={gpt2_run.run_dir}"]) == 2
    assert main(["serve", str(gpt2_run.run_dir), "--max-batch-size", "0"]) == 2


def test_serve_binds_loopback_by_default():
    from lora_ft.cli import make_parser

    args, _ = make_parser().parse_known_args(["serve", "run"])
    assert args.host == "127.0.0.1"


# ---------------------------------------------------------------- requests end with their clients (issue 18 §4)


@pytest.fixture
def endless_chat(served, monkeypatch):
    """The chat run with its EOS suppressed, so a generation runs to max_new_tokens unless something stops it;
    returns the list every generate_one result is appended to."""
    import copy

    import lora_ft.inference as inference

    gc = copy.deepcopy(served["chat"].generation_config)
    gc.min_new_tokens = 10**4
    monkeypatch.setattr(served["chat"], "generation_config", gc)
    results, real = [], inference.generate_one
    monkeypatch.setattr(inference, "generate_one", lambda *a, **k: results.append(real(*a, **k)) or results[-1])
    return results


def test_timed_out_generation_stops(served, endless_chat):
    c = client(served, timeout_s=0.05)
    r = c.post("/v1/generate", json={"model": "chat", "prompt": "hello", "max_new_tokens": 200})
    assert r.status_code == 504
    c = client(served)  # queued behind the abandoned job on the same base thread: returns once that one ended
    assert c.post("/v1/generate", json={"model": "chat", "prompt": "hello", "max_new_tokens": 1}).status_code == 200
    assert endless_chat[0]["completion_tokens"] < 150  # 200 (about 0.4 s) when the worker ignored the timeout


def test_disconnected_stream_stops(live_server, endless_chat):
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 200, "stream": True}
    auth = {"Authorization": "Bearer k"}
    with httpx.Client(timeout=30) as h:
        for _ in range(3):  # abandoned streams used to hold the base until max_tokens each
            with h.stream("POST", f"{live_server}/chat/completions", json=body, headers=auth) as r:
                next(r.iter_lines())
        quick = {"model": "chat", "prompt": "hello", "max_new_tokens": 1}
        assert h.post(f"{live_server}/generate", json=quick, headers=auth).status_code == 200
    # A stream cancelled before its turn never generates; one that started stops at its next step.
    assert endless_chat and all(o["completion_tokens"] < 150 for o in endless_chat), [o["completion_tokens"] for o in endless_chat]


def test_failing_stream_reports_at_once(served, monkeypatch):
    import lora_ft.inference as inference

    monkeypatch.setattr(inference, "generate_one", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom /secret/path")))
    started = time.perf_counter()
    r = client(served, timeout_s=5).post("/v1/chat/completions", json={
        "model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert time.perf_counter() - started < 2.5  # the streamer's 5 s timeout was the old end
    assert "generation failed" in r.text and "boom" not in r.text and "secret" not in r.text


def test_prompt_over_the_positions_is_413(served):
    from lora_ft.inference import render_prompt

    c = client(served)
    r = c.post("/v1/generate", json={"model": "chat", "prompt": "word " * 300, "max_new_tokens": 8})
    assert r.status_code == 413 and "256 positions" in r.text, r.text
    sm = served["chat"]
    k = len(render_prompt(sm.tok, "hello", True, sm.recipe.args.system_prompt))
    r = c.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "hello"}],
                                            "max_tokens": 256 - k + 1, "stream": True})
    assert r.status_code == 413 and f"{k} tokens plus {256 - k + 1} new tokens" in r.text, r.text


def test_metrics_label_routes_not_paths(served):
    c = client(served)
    for i in range(3):
        assert c.get(f"/no/such/path/{i}").status_code == 404
    c.post("/v1/classify", json={"model": "gpt2", "inputs": ["x"]})
    text = c.get("/metrics").text
    assert "/no/such" not in text
    assert 'lora_ft_requests_total{endpoint="unmatched",model="",status="404"} 3.0' in text
    assert 'endpoint="/v1/classify"' in text


def test_key_checked_before_the_body_and_on_openapi(served):
    c = client(served, api_key="s3cret")
    r = c.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401 and "API key" in r.text  # a 422 would tell a stranger about the schema
    assert c.get("/openapi.json").status_code == 401
    assert c.get("/openapi.json", headers={"Authorization": "Bearer s3cret"}).status_code == 200


@pytest.mark.parametrize("bind, allowed, host, status", [
    ("127.0.0.1", (), "localhost:8000", 200),
    ("127.0.0.1", (), "127.0.0.1:1", 200),
    ("127.0.0.1", (), "[::1]:8000", 200),
    ("127.0.0.1", (), "LOCALHOST", 200),
    ("127.0.0.1", (), "evil.example", 421),
    ("127.0.0.1", (), "evil.example:8000", 421),
    ("127.0.0.1", (), "localhost:abc", 400),
    ("127.0.0.1", (), "", 400),
    ("10.1.2.3", (), "10.1.2.3:8000", 200),
    ("10.1.2.3", (), "10.1.2.4:8000", 421),
    ("0.0.0.0", ("api.example.com",), "api.example.com:443", 200),
    ("0.0.0.0", ("api.example.com",), "0.0.0.0:8000", 421),
    ("0.0.0.0", ("*",), "anything.example", 200),
])
def test_host_header_checked_against_the_bind(served, bind, allowed, host, status):
    r = client(served, host=bind, allowed_hosts=allowed).get("/v1/models", headers={"host": host})
    assert r.status_code == status, r.text
    if status == 421:
        assert "--allowed-hosts" in r.text


def test_empty_api_key_refused(served, gpt2_run, capsys, monkeypatch):
    from lora_ft.errors import LoraFtError

    with pytest.raises(LoraFtError, match="API key is empty"):
        ServeSettings(api_key=" ")
    assert main(["serve", str(gpt2_run.run_dir), "--api-key", ""]) == 2
    monkeypatch.setenv("LORA_FT_API_KEY", "")
    assert main(["serve", str(gpt2_run.run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("API key is empty") == 2 and "Traceback" not in err


def test_run_without_generation_config_gets_its_own(chat_model, tmp_path):
    """Two chat adapters on one base; the first saved EOS ids of its own, the second saved none."""
    import shutil

    own, bare = tmp_path / "own", tmp_path / "bare"
    shutil.copytree(chat_model, own)
    shutil.copytree(chat_model, bare)
    cfg = json.loads((own / "generation_config.json").read_text())
    (own / "generation_config.json").write_text(json.dumps({**cfg, "eos_token_id": [cfg["eos_token_id"], 7]}))
    (bare / "generation_config.json").unlink()
    models = load_models([str(own), str(bare)])
    assert models["own"].group is models["bare"].group
    models["own"].activate()
    want = load_run(bare)[0].generation_config.eos_token_id  # what `lora-ft generate` stops on for that run
    assert models["bare"].activate().generation_config.eos_token_id == want != [cfg["eos_token_id"], 7]


def test_seeded_sampling_leaves_the_process_rng_alone(served):
    import torch

    c = client(served)
    body = {"model": "chat", "prompt": "hello", "max_new_tokens": 12, "temperature": 1.5, "seed": 7}
    torch.manual_seed(0)
    state = torch.get_rng_state()
    one = c.post("/v1/generate", json=body).json()
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)  # another seeding elsewhere in the process changes nothing
    assert c.post("/v1/generate", json=body).json() == one
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hello"}], "temperature": 1.0, "max_tokens": 4}
    assert c.post("/v1/chat/completions", json=chat).status_code == 200  # unseeded: a fresh generator
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(123).get_state())
