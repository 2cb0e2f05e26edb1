"""Secrets never leave the process: tokens are redacted from anything logged or saved."""

from __future__ import annotations

import re
from typing import Any

# Hugging Face tokens (hf_...), and any key whose name says it holds a secret.
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")
_SECRET_KEYS = ("token", "api_key", "password", "secret")


def redact_text(text: str) -> str:
    return _TOKEN_RE.sub("hf_***", text)


def redact(obj: Any, key: str = "") -> Any:
    """A copy of `obj` with secret-looking values replaced. Keys ending in a secret word are blanked."""
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, key) for v in obj)
    if isinstance(obj, str):
        if obj and any(key.lower().endswith(s) for s in _SECRET_KEYS) and not key.lower().startswith("push_to_hub_model"):
            return "***"
        return redact_text(obj)
    return obj
