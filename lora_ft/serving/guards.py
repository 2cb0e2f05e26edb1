"""ASGI guards that answer before any route runs: the Host header, the API key, the body size.

They sit outside FastAPI so that a refused request costs no body parsing and reaches no route, docs or metrics.
"""

from __future__ import annotations

import hmac
from typing import Iterable, Optional

from fastapi.responses import JSONResponse

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
OPEN_PATHS = frozenset({"/health"})  # liveness probes carry no key


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def host_name(value: str) -> Optional[str]:
    """'Example.com:8000' -> 'example.com', '[::1]:80' -> '::1'; None for a malformed Host value."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        name, rest = (v[1:end], v[end + 1:]) if end > 0 else ("", "")
    else:
        name, _, port = v.partition(":")
        rest = ":" + port if _ else ""
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None
    name = name.rstrip(".")
    return name or None


def accepted_hosts(bind: str, extra: Iterable[str] = ()) -> Optional[frozenset]:
    """The Host names a server bound to `bind` answers; None accepts any ('*' in `extra`)."""
    names = set(LOOPBACK_NAMES)
    b = bind.strip().strip("[]").lower()
    if b not in WILDCARD_BINDS:
        names.add(b)
    for h in extra:
        if h.strip() == "*":
            return None
        name = host_name(h)
        if name:
            names.add(name)
    return frozenset(names)


class HostGuard:
    """DNS rebinding: a browser page on evil.example that resolves to 127.0.0.1 still sends Host: evil.example."""

    def __init__(self, app, allowed: Optional[frozenset]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.allowed is None:
            return await self.app(scope, receive, send)
        raw = dict(scope.get("headers") or []).get(b"host")
        name = host_name(raw.decode("latin-1")) if raw else None
        if name is None:
            return await error_response(400, "missing or malformed Host header", "invalid_request_error")(scope, receive, send)
        if name not in self.allowed:
            msg = f"Host '{name[:100]}' is not served here; start the server with --allowed-hosts {name[:100]} to accept it"
            return await error_response(421, msg, "misdirected_request")(scope, receive, send)
        return await self.app(scope, receive, send)


class KeyGuard:
    """Bearer-key check on every path but /health, before the body is read (so no 422 leaks to strangers)."""

    def __init__(self, app, api_key: Optional[str]):
        self.app = app
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.expected is None or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            msg = "missing or wrong API key; send Authorization: Bearer KEY"
            return await error_response(401, msg, "authentication_error")(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """A body beyond the limit gets 413 before the app reads it, declared length or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await error_response(413, f"request body over {self.limit} bytes", "request_too_large")(scope, receive, send)
        seen, rejected = 0, False

        async def limited():
            nonlocal seen, rejected
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit and not rejected:  # answer now; the app sees the client gone
                rejected = True
                await error_response(413, f"request body over {self.limit} bytes", "request_too_large")(scope, receive, send)
                return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            if not rejected:  # after a 413 the app's own answer (to a "disconnected" client) is dropped
                await send(msg)

        try:
            await self.app(scope, limited, guarded_send)
        except Exception:
            if not rejected:
                raise
