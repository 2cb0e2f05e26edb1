"""Hub names: repo ids, the Hub id a model name refers to, the token (read, never logged or saved)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from ..builtin_models import BUILTINS, PREFIX
from ..errors import LoraFtError

CARD_FILE = "README.md"
CARD_MARK = "and published with `lora-ft push`"  # in every card stage() writes: how --output knows a staging of ours

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
MODEL_CONFIG_FILES = ("config.json", "generation_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DATA_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".txt", ".tsv", ".arrow")

# Hub repo names: letters, digits, - _ . ; no leading/trailing - or ., no "--" or "..", at most 96 characters.
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,94}[A-Za-z0-9])?(/[A-Za-z0-9]([A-Za-z0-9._-]{0,94}[A-Za-z0-9])?)?$")

ADAPTER, MERGED, MODEL = "adapter", "merged", "model"

def hub_id_of(name: Optional[str]) -> Optional[str]:
    """The Hub id a model or dataset name refers to: builtin:NAME -> its Hub model; a local path -> None."""
    if not name:
        return None
    name = str(name)
    if name.startswith(PREFIX):
        m = BUILTINS.get(name[len(PREFIX):])
        return (m.hub_id or None) if m else None
    if os.path.isabs(name) or name.startswith((".", "~")) or Path(name).exists():
        return None
    if Path(name).suffix.lower() in DATA_SUFFIXES or "--" in name or ".." in name:
        return None
    return name if HUB_ID_PATTERN.match(name) else None

def check_repo_id(repo_id: str) -> str:
    if "/" not in repo_id or not HUB_ID_PATTERN.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise LoraFtError(f"push: --repo-id '{repo_id}' is not a Hub repo id; expected user/name or org/name "
                          "(letters, digits, - _ .)")
    return repo_id

def get_token() -> Optional[str]:
    """HF_TOKEN, else the token stored by `hf auth login`. Never printed, logged or written by lora_ft."""
    from huggingface_hub import get_token as hf_get_token

    return hf_get_token()

def require_token(token: Optional[str]) -> str:
    if not token:
        raise LoraFtError("push: no Hugging Face token; run `hf auth login` (huggingface_hub's successor to "
                          "`huggingface-cli login`) or set HF_TOKEN to a token with write access")
    return token
