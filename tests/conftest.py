"""Shared offline fixtures: tokenizers trained in-process, tiny random base models, tiny CSV datasets.

Nothing here (or in any default test) may touch the network; the environment variables below make the
Hugging Face libraries fail fast instead of trying.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models on a shared 2-core box: thread hand-offs cost more than the matmuls. One thread is several
# times faster here, and inherited by the CLI subprocesses. Set before anything imports torch.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LORA_FT = str(BIN / "lora-ft")
QUICKSTART = REPO / "data" / "quickstart"
SHARED_DATA = REPO.parent / "shared" / "data"
LABELS = ["negative", "neutral", "positive"]

# Small, fast training: a handful of steps, no checkpoints, tensorboard or mid-run eval (the final eval still
# runs), fp32 whatever the CPU offers. Written into recipe files, where YAML quoting keeps "no" a string.
FAST = {"max_steps": 4, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 32, "eval_strategy": "no",
        "save_strategy": "no", "report_to": "none", "logging_steps": 1, "max_length": 32, "disable_tqdm": True,
        "bf16": False, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 5e-3}


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_csv(path: Path, rows: list[dict], fields=None) -> Path:
    fields = fields or list(rows[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_recipe(path: Path, **keys) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(keys, sort_keys=False), encoding="utf-8")
    return path


def run_cli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """The installed `lora-ft` console script in a fresh process, as a user runs it."""
    return subprocess.run([LORA_FT, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=os.environ.copy())


def json_lines(text: str) -> list[dict]:
    """Strict: every non-empty line must be one JSON object (stdout carries data only)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()] if text.strip() else []


# ---------------------------------------------------------------- tokenizers


def _sentences() -> list[str]:
    rows = read_rows(QUICKSTART / "train.csv") + read_rows(QUICKSTART / "test.csv")
    return [r["text"] for r in rows]


def _train_bpe(specials: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_sentences(), trainer)
    return tok


def build_gpt2_tokenizer(out: Path) -> Path:
    """Byte-level BPE like GPT-2's: one special token for bos/eos/unk, and deliberately NO pad token."""
    from transformers import PreTrainedTokenizerFast

    raw = _train_bpe(["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", model_max_length=128)
    assert tok.pad_token is None
    tok.save_pretrained(out)
    return out


def build_llama_tokenizer(out: Path) -> Path:
    """BPE with <s> prepended like Llama's; no pad token."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    raw = _train_bpe(["<unk>", "<s>", "</s>"])
    bos = raw.token_to_id("<s>")
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  model_max_length=128)
    assert tok.pad_token is None
    tok.save_pretrained(out)
    return out


def build_bert_tokenizer(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.decoder = decoders.WordPiece()
    raw.train_from_iterator(_sentences(), trainers.WordPieceTrainer(vocab_size=500, special_tokens=specials, show_progress=False))
    cls, sep = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------- tiny base models (no classification head)


def _save_base(model, out: Path) -> Path:
    model.save_pretrained(out, safe_serialization=True)
    assert (out / "model.safetensors").is_file()
    return out


def build_tiny_gpt2(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    build_gpt2_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return _save_base(GPT2Model(cfg), out)


def build_tiny_llama(out: Path) -> Path:
    """Hidden 64 / intermediate 128: multiples of 64, which bitsandbytes' 4-bit blocks want."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    build_llama_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return _save_base(LlamaModel(cfg), out)


def build_tiny_bert(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    build_bert_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    return _save_base(BertModel(cfg), out)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


# ---------------------------------------------------------------- data


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A folder with train.csv (120 rows) and test.csv (40 rows), string labels, copied from data/quickstart."""
    out = tmp_path_factory.mktemp("tiny-data")
    write_csv(out / "train.csv", read_rows(QUICKSTART / "train.csv")[:120], ["text", "label"])
    write_csv(out / "test.csv", read_rows(QUICKSTART / "test.csv")[:40], ["text", "label"])
    return out


def cls_recipe(path: Path, model: Path, data: Path, **extra) -> Path:
    """A fast sequence-classification recipe for a tiny model (extra keys win)."""
    keys = {"model_name_or_path": str(model), "task": "sequence-classification", "dataset_name": str(data),
            "text_column": "text", "label_column": "label", "labels": LABELS, **FAST, **extra}
    return write_recipe(path, **keys)


def train_in_process(recipe: Path, output_dir: Path, *overrides) -> Path:
    """`lora-ft train RECIPE --output_dir OUT ...` through the CLI entry point, in this process (no import cost)."""
    from lora_ft.cli import main

    rc = main(["train", str(recipe), "--output_dir", str(output_dir), *map(str, overrides)])
    assert rc == 0, f"lora-ft train exited {rc}"
    return output_dir


@dataclass
class TrainedRun:
    run_dir: Path
    recipe: Path
    overrides: list
    base: Path


def _trained(tmp_path_factory, name: str, base: Path, data: Path, *overrides, **extra) -> TrainedRun:
    root = tmp_path_factory.mktemp(name)
    recipe = cls_recipe(root / f"{name}.yaml", base, data, **extra)
    run_dir = train_in_process(recipe, root / "run", *overrides)
    return TrainedRun(run_dir, recipe, list(overrides), base)


@pytest.fixture(scope="session")
def gpt2_run(tmp_path_factory, tiny_gpt2, tiny_data) -> TrainedRun:
    """GPT-2 tiny (no pad token in its tokenizer) + LoRA; two keys come as CLI overrides."""
    return _trained(tmp_path_factory, "gpt2-run", tiny_gpt2, tiny_data, "--lora_r", "8", "--learning_rate", "1e-2")


@pytest.fixture(scope="session")
def bert_run(tmp_path_factory, tiny_bert, tiny_data) -> TrainedRun:
    return _trained(tmp_path_factory, "bert-run", tiny_bert, tiny_data)


@pytest.fixture(scope="session")
def llama_run(tmp_path_factory, tiny_llama, tiny_data) -> TrainedRun:
    return _trained(tmp_path_factory, "llama-run", tiny_llama, tiny_data)


# Files whose tests launch several processes (each pays torch + transformers + peft imports, ~12 s on a slow
# 2-core CPU): collected first, so that under `-n 2 --dist loadfile` the longest files start first and the shorter
# ones fill in behind them, instead of one worker running them alone at the end.
LAUNCHING_FILES = ("test_scale_out.py", "test_scale_resume.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in LAUNCHING_FILES)  # stable: the order within each part is kept
