"""Upload: the staged folder and nothing else, with errors that name the step and never the token."""

from __future__ import annotations

import os
from typing import Optional

from ..errors import LoraFtError
from ..security import redact_text
from .names import require_token

DEFAULT_ENDPOINT = "https://huggingface.co"

def resolve_endpoint(endpoint: Optional[str] = None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")

def upload(staged: str | os.PathLike, repo_id: str, *, token: Optional[str], private: bool = False,
           revision: str = "main", commit_message: Optional[str] = None, endpoint: Optional[str] = None) -> dict:
    """Create the repo if needed (and the branch, for a revision other than main) and upload `staged` as one commit."""
    from huggingface_hub import HfApi, constants

    url = resolve_endpoint(endpoint)
    require_token(token)
    if constants.is_offline_mode():
        raise LoraFtError("push: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or stage only with "
                          "--dry-run --output DIR")
    api = HfApi(endpoint=url, token=token)
    step = "create repo"
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            step = f"create branch {revision}"
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        step = "upload"
        info = api.upload_folder(repo_id=repo_id, folder_path=str(staged), repo_type="model", revision=revision,
                                 commit_message=commit_message or "lora-ft push")
    except Exception as e:
        msg = _failure(e, url, repo_id, step)
        if msg is None:
            raise
        raise LoraFtError(_scrub(msg, token)) from None
    tree = f"{url}/{repo_id}" + (f"/tree/{revision}" if revision and revision != "main" else "")
    return {"repo_id": repo_id, "revision": revision, "url": tree, "commit_url": getattr(info, "commit_url", None),
            "commit": getattr(info, "oid", None)}

def _failure(e: BaseException, url: str, repo_id: str, step: str) -> Optional[str]:
    """One line for a failed Hub call, looking through wrappers (huggingface_hub wraps LFS errors in RuntimeError);
    None for a failure that is not the Hub's or the network's (a bug: let its traceback show)."""
    from huggingface_hub.errors import HfHubHTTPError

    seen = e
    while seen is not None:
        if isinstance(seen, HfHubHTTPError):
            return _http_message(seen, url, repo_id, step)
        root = type(seen).__module__.split(".")[0]
        if isinstance(seen, (ConnectionError, TimeoutError)) or root in ("httpx", "httpx2", "httpcore", "hf_xet"):
            return (f"push: cannot reach {url} during {step} ({type(seen).__name__}: {_first_line(seen)}); "
                    "check the network or HF_ENDPOINT, or stage only with --dry-run --output DIR")
        if isinstance(seen, ValueError):  # the Hub rejected the card metadata, or answered something malformed
            return f"push: {url} refused the {step} ({_one_line(seen)})"
        seen = seen.__cause__
    return None

def _http_message(e, url: str, repo_id: str, step: str) -> str:
    resp = getattr(e, "response", None)
    status = getattr(resp, "status_code", None)
    server = getattr(e, "server_message", None) or ""
    why = f" ({_first_line(server)})" if server else ""
    if status == 401:
        return (f"push: {url} rejected the token during {step} (401){why}; log in again with `hf auth login` or set "
                "HF_TOKEN to a valid token")
    if status == 403:
        return f"push: no write access to {repo_id} on {url} (403){why}; use a token with write scope for that namespace"
    if status == 404:
        return f"push: {url} has no {repo_id} to {step} into (404){why}; check --repo-id and --revision"
    return f"push: {url} answered {status} during {step}{why or ' (' + _first_line(e) + ')'}"

def _first_line(e) -> str:
    text = str(e).strip()
    return redact_text(text.splitlines()[0] if text else type(e).__name__)

def _one_line(e) -> str:
    """All of a multi-line message (the Hub lists metadata errors one per line) on one line."""
    parts = [ln.strip(" -") for ln in str(e).splitlines() if ln.strip(" -")]
    return redact_text("; ".join(parts)[:500] or type(e).__name__)

def _scrub(msg: str, token: Optional[str]) -> str:
    msg = redact_text(msg)
    return msg.replace(token, "***") if token else msg
