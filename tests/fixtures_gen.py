"""Offline builders for the generative task tests (causal-lm, seq2seq): tokenizers trained in-process, a tiny
random Llama saved as a causal LM (plain and chat tokenizer), a tiny random T5 with ByT5Tokenizer, small data.

Kept out of conftest.py (which serves the classification suite) so the two can change independently; the test
modules import the fixtures from here. Nothing touches the network.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_k] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SQUAD_DEV = REPO.parent / "shared" / "data" / "squad" / "dev.jsonl"

# ChatML as SmolLM2 and Qwen render it: the assistant turn ends with <|im_end|> and a newline.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

# A handful of short Q/A pairs: what the memorization tests reproduce word for word.
QA = [
    ("What color is the sky?", "The sky is blue."),
    ("Name a fruit.", "A banana."),
    ("Who wrote Hamlet?", "William Shakespeare."),
    ("How many legs has a cat?", "Four legs."),
]
MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "What color is the sky?"},
    {"role": "assistant", "content": "The sky is blue today."},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_recipe(path: Path, **keys) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(keys, sort_keys=False), encoding="utf-8")
    return path


def train_run(root: Path, name: str, model, data, *, fast: dict, **keys) -> Path:
    """`lora-ft train` in process on a recipe of the file's `fast` keys (overridden by `keys`): the run dir."""
    from lora_ft.cli import main

    recipe = write_recipe(root / f"{name}.yaml", model_name_or_path=str(model), dataset_name=str(data), **{**fast, **keys})
    out = root / name
    assert main(["train", str(recipe), "--output_dir", str(out)]) == 0
    return out


def json_lines(text: str) -> list[dict]:
    """Strict: every non-empty stdout line must be one JSON object."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _corpus() -> list[str]:
    texts = []
    for name in ("train.csv", "test.csv"):
        p = REPO / "data" / "quickstart" / name
        if p.is_file():
            with open(p, newline="", encoding="utf-8") as fh:
                texts += [r["text"] for r in csv.DictReader(fh)]
    for q, a in QA:
        texts += [q, a]
    texts += [m["content"] for m in MULTI_TURN]
    texts += ["user", "assistant", "system", "### Instruction:", "### Response:", "### Input:"]
    return texts * 2


def _raw_bpe(vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(_corpus(), trainer)
    return raw


def build_llama_tokenizers(plain_dir: Path, chat_dir: Path):
    """Two tokenizers over one vocabulary: plain (eos </s>) and chat (ChatML template, eos <|im_end|>)."""
    from transformers import PreTrainedTokenizerFast

    raw = _raw_bpe()
    common = dict(tokenizer_object=raw, bos_token="<s>", unk_token="<unk>", pad_token="<pad>", model_max_length=256)
    plain = PreTrainedTokenizerFast(eos_token="</s>", **common)
    plain.save_pretrained(plain_dir)
    chat = PreTrainedTokenizerFast(eos_token="<|im_end|>", **common)
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat.chat_template = CHATML
    chat.save_pretrained(chat_dir)
    return plain, chat


def build_tiny_llama(out: Path, tok) -> Path:
    """Hidden 64 / intermediate 128 (multiples of 64 for bitsandbytes' 4-bit blocks), with its LM head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    # With the usual 0.02 init the head's logits stay within about +-1 whatever the (normed) hidden state, and LoRA,
    # which leaves the head alone, cannot push the loss below ~5. A pretrained head is not like that; this one is
    # wide enough for a handful of LoRA steps to memorize a few answers.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_tiny_t5(out: Path) -> Path:
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    tok = ByT5Tokenizer()
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=64, d_kv=32, d_ff=128, num_layers=2, num_decoder_layers=2,
                   num_heads=2, dropout_rate=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------- fixtures (session scope: built once)


@pytest.fixture(scope="session")
def llama_models(tmp_path_factory):
    """(plain_model_dir, chat_model_dir): the same random weights, saved with each tokenizer."""
    root = tmp_path_factory.mktemp("gen-llama")
    plain, chat = build_llama_tokenizers(root / "tok-plain", root / "tok-chat")
    assert len(plain) == len(chat)
    plain_dir = build_tiny_llama(root / "llama-plain", plain)
    chat_dir = build_tiny_llama(root / "llama-chat", chat)
    return plain_dir, chat_dir


@pytest.fixture(scope="session")
def plain_tok(llama_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_models[0])


@pytest.fixture(scope="session")
def chat_tok(llama_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_models[1])


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("gen-t5"))


@pytest.fixture(scope="session")
def squad_slice(tmp_path_factory) -> Path:
    """A folder with train.jsonl and dev.jsonl: the first 32 rows of the shared SQuAD dev set (answers dicts)."""
    if not SQUAD_DEV.is_file():
        pytest.skip(f"{SQUAD_DEV} not present")
    out = tmp_path_factory.mktemp("squad32")
    with open(SQUAD_DEV, encoding="utf-8") as fh:
        rows = [json.loads(next(fh)) for _ in range(32)]
    write_jsonl(out / "train.jsonl", rows)
    write_jsonl(out / "dev.jsonl", rows)
    return out
