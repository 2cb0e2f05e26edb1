"""What leaves the process: secrets redacted from anything logged or saved, local paths from anything published."""

from __future__ import annotations

import os
import re
from typing import Any

# Hugging Face tokens (hf_...): caught by shape under any key, and inside longer strings.
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")
# Keys that hold a secret by name. Exact names, not suffixes: trl's `eos_token` and `pad_token` are recipe
# settings, and blanking them broke `lora-ft train` on a pushed recipe.
_SECRET_KEYS = frozenset({"hub_token", "token", "hf_token", "api_key", "password", "secret"})
# An absolute POSIX path standing alone or after a space, quote, bracket or '=' (so "1/2" and URLs stay as they are).
_ABS_PATH_RE = re.compile(r"(?<![^\s'\"`(=\[])/[^\s'\"`),;\]]+")


def redact_text(text: str) -> str:
    return _TOKEN_RE.sub("hf_***", text)


def _is_secret_key(key: str) -> bool:
    k = key.lower()
    return k in _SECRET_KEYS or k.endswith(("_api_key", "_password", "_secret"))


def redact(obj: Any, key: str = "") -> Any:
    """A copy of `obj` with secrets replaced: values under a secret key, and token-shaped text anywhere."""
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, key) for v in obj)
    if isinstance(obj, str):
        if obj and _is_secret_key(key):
            return "***"
        return redact_text(obj)
    return obj


def _local_name(match: re.Match) -> str:
    return "./" + (os.path.basename(match.group(0).rstrip("/")) or "")


def portable(obj: Any) -> Any:
    """A copy of `obj` with absolute local paths cut to ./NAME: where a file sat on this machine means nothing
    on the Hub, and says who and where the author is."""
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(portable(v) for v in obj)
    if isinstance(obj, str):
        text = obj
        home = os.path.expanduser("~")
        if text.startswith("~/"):
            text = home + text[1:]
        return _ABS_PATH_RE.sub(_local_name, text)
    return obj
