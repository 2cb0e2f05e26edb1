"""Fuzzing (hypothesis, bounded): the recipe parser, the data loaders and the server's request schema answer every
input with a result or one of lora_ft's own errors: never a traceback of another kind, never a hang."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_ft.config import load_recipe, resolve
from lora_ft.data import load_splits
from lora_ft.errors import LoraFtError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
KEYS = ["model_name_or_path", "dataset_name", "task", "lora_r", "lora_alpha", "lora_dropout", "labels", "max_length",
        "learning_rate", "num_train_epochs", "eval_split", "bf16", "fp16", "load_in_4bit", "load_in_8bit", "column_map",
        "source_template", "head_init", "lora_target_modules", "eval_strategy", "seed", "per_device_train_batch_size",
        "max_train_samples", "eval_size", "use_peft", "dtype", "bnb_4bit_quant_type", "warmup_steps", "lerning_rate"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=20))
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=8), scalars, max_size=3))


@FUZZ
@given(st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), values, max_size=8))
def test_recipe_dicts(raw):
    try:
        resolve(raw)
    except LoraFtError:
        pass


@FUZZ
@given(st.text(max_size=300))
def test_recipe_yaml_text(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    p.write_text(text, encoding="utf-8")
    try:
        load_recipe(str(p))
    except LoraFtError:
        pass


@FUZZ
@given(st.lists(st.sampled_from(["--lora_r", "--labels", "--bf16", "--eval_split", "--column_map", "--x", "-", "--", "4",
                                 "a,b", "{a: b}", "none", "true", "1e-3", "[1, 2", "--source_template", "{text}"]), max_size=8))
def test_cli_overrides(argv):
    try:
        load_recipe(None, ["--model_name_or_path", "m", "--dataset_name", "d", *argv])
    except LoraFtError:
        pass


@FUZZ
@given(st.binary(max_size=400), st.sampled_from([".csv", ".jsonl", ".json", ".tsv"]))
def test_data_files(tmp_path_factory, blob, ext):
    d = tmp_path_factory.mktemp("fuzzdata")
    (d / f"train{ext}").write_bytes(blob)
    try:
        load_splits(str(d), "train", None)
    except LoraFtError:
        pass


@pytest.fixture(scope="module")
def app(gpt2_run):
    from lora_ft.serving.app import ServeSettings, build_app
    from lora_ft.serving.registry import load_models

    return build_app(load_models([f"m={gpt2_run.run_dir}"]), ServeSettings(max_inputs=16, max_input_chars=200, max_new_tokens=8))


json_values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)), max_leaves=12)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"model": st.one_of(st.just("m"), st.text(max_size=10)), "inputs": json_values}),
    st.fixed_dictionaries({"model": st.just("m"), "inputs": st.lists(st.text(max_size=40), max_size=20)}),
    st.fixed_dictionaries({"model": st.just("m"), "messages": json_values, "max_tokens": json_values}),
)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["/v1/classify", "/v1/generate", "/v1/chat/completions"]), bodies)
def test_server_requests(app, path, body):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://localhost") as c:  # the Host guard answers loopback names
            return await asyncio.wait_for(c.post(path, content=json.dumps(body)), 30)

    r = asyncio.run(go())
    assert r.status_code in (200, 400, 404, 413, 422), (r.status_code, r.text)
