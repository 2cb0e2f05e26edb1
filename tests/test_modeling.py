"""Tokenizer/model loading helpers: the pad-token fix, pickle refusal, quantization and LoRA configs."""

from __future__ import annotations

import pytest

from lora_ft.config import resolve
from lora_ft.errors import LoraFtError
from lora_ft.modeling import (
    HEAD_NAMES,
    check_weights_safe,
    fix_pad_token,
    load_model,
    load_tokenizer,
    lora_config,
    new_top_modules,
    quantization_config,
)


def args(**keys):
    return resolve({"model_name_or_path": "m", "dataset_name": "d", **keys}).args


def bare_tokenizer(tiny_gpt2, **specials):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = AutoTokenizer.from_pretrained(tiny_gpt2).backend_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=raw, **specials)


def test_pad_falls_back_to_eos(tiny_gpt2):
    tok = bare_tokenizer(tiny_gpt2, eos_token="<|endoftext|>")
    n = len(tok)
    fix_pad_token(tok)
    assert tok.pad_token == "<|endoftext|>" and len(tok) == n


def test_pad_falls_back_to_unk(tiny_gpt2):
    tok = bare_tokenizer(tiny_gpt2, unk_token="<|endoftext|>")
    fix_pad_token(tok)
    assert tok.pad_token == "<|endoftext|>"


def test_pad_is_added_when_nothing_fits(tiny_gpt2):
    tok = bare_tokenizer(tiny_gpt2)
    n = len(tok)
    fix_pad_token(tok)
    assert tok.pad_token == "<pad>" and len(tok) == n + 1


def test_existing_pad_is_kept(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    fix_pad_token(tok)
    assert tok.pad_token == "[PAD]"


def test_load_tokenizer_applies_the_fix(tiny_llama):
    tok = load_tokenizer(args(model_name_or_path=str(tiny_llama)))
    assert tok.pad_token == tok.eos_token == "</s>"


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(LoraFtError, match="allow_pickle") as exc:
        check_weights_safe(str(tmp_path), allow_pickle=False)
    assert str(tmp_path) in str(exc.value)
    check_weights_safe(str(tmp_path), allow_pickle=True)
    (tmp_path / "model.safetensors").write_bytes(b"")
    check_weights_safe(str(tmp_path), allow_pickle=False)  # safetensors present: fine


def test_unloadable_model_is_a_clean_error(tmp_path):
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(LoraFtError, match="model_name_or_path: cannot load"):
        load_model(args(model_name_or_path=str(tmp_path)), AutoModelForSequenceClassification)
    with pytest.raises(LoraFtError, match="no-such-org/no-such-model"):  # offline: fails fast, no hang
        load_tokenizer(args(model_name_or_path="no-such-org/no-such-model"))


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(LoraFtError, match="minilm-l6"):
        load_tokenizer(args(model_name_or_path="builtin:nope"))


def test_quantization_configs():
    assert quantization_config(args()) is None
    q4 = quantization_config(args(load_in_4bit=True, use_bnb_nested_quant=True), skip_modules=HEAD_NAMES)
    assert q4.load_in_4bit and q4.bnb_4bit_quant_type == "nf4" and q4.bnb_4bit_use_double_quant
    assert set(HEAD_NAMES) <= set(q4.llm_int8_skip_modules)
    q8 = quantization_config(args(load_in_8bit=True), skip_modules=("score",))
    assert q8.load_in_8bit and not q8.load_in_4bit and q8.llm_int8_skip_modules == ["score"]


def test_lora_config():
    assert lora_config(args(use_peft=False), "SEQ_CLS", []) is None
    c = lora_config(args(lora_r=4, lora_alpha=8, use_rslora=True), "SEQ_CLS", ["score"])
    assert (c.r, c.lora_alpha, c.use_rslora) == (4, 8, True)
    assert c.target_modules == "all-linear"
    assert set(c.exclude_modules) == {"score"} and "score" in c.modules_to_save
    c2 = lora_config(args(lora_target_modules="q_proj,v_proj"), "SEQ_CLS", [])
    assert set(c2.target_modules) == {"q_proj", "v_proj"} and not c2.modules_to_save


@pytest.mark.parametrize("missing, expected", [
    (["score"], ["score"]),
    (["classifier"], ["classifier"]),
    (["bert.pooler.dense", "classifier"], ["classifier", "pooler"]),
    (["pre_classifier", "classifier"], ["classifier", "pre_classifier"]),
])
def test_new_top_modules(missing, expected):
    assert new_top_modules(None, missing) == expected
