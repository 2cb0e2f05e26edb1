"""The FastAPI app: classify, generate, OpenAI chat completions, model list, health and Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .batcher import DynamicBatcher
from .registry import ServedModel
from .schemas import ChatRequest, ClassifyRequest, GenerateRequest


@dataclass
class ServeSettings:
    api_key: Optional[str] = None
    max_batch_size: int = 32  # 1 turns dynamic batching off
    max_wait_ms: float = 5.0
    timeout_s: float = 60.0
    max_body_bytes: int = 1 << 20
    max_inputs: int = 256  # texts or prompts per request
    max_input_chars: int = 20_000  # per text, prompt or chat conversation
    max_new_tokens: int = 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class BodyLimit:
    """ASGI middleware: a body beyond the limit gets 413 before the app reads it, declared length or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _error(413, f"request body over {self.limit} bytes", "request_too_large")(scope, receive, send)
        seen, rejected = 0, False

        async def limited():
            nonlocal seen, rejected
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit and not rejected:  # answer now; the app sees the client gone
                rejected = True
                await _error(413, f"request body over {self.limit} bytes", "request_too_large")(scope, receive, send)
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


def build_app(models: dict[str, ServedModel], settings: ServeSettings = ServeSettings()) -> FastAPI:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

    registry = CollectorRegistry()
    requests = Counter("lora_ft_requests", "requests by endpoint, model and status", ["endpoint", "model", "status"], registry=registry)
    latency = Histogram("lora_ft_request_seconds", "request latency", ["endpoint"], registry=registry)
    batch_hist = Histogram("lora_ft_batch_size", "inputs per classification forward pass", registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128))
    executors = {id(m.group): ThreadPoolExecutor(1, thread_name_prefix="lora-ft-model") for m in models.values()}

    def run_classify(sm: ServedModel):
        from .. import inference

        def run(texts: list[str]) -> list[dict]:
            batch_hist.observe(len(texts))
            with sm.group.lock:
                rows = inference.classify(sm.activate(), sm.tok, texts, sm.recipe, batch_size=settings.max_batch_size)
            return [{k: r[k] for k in ("label", "score", "scores")} for r in rows]

        return run

    batchers = {name: DynamicBatcher(run_classify(sm), executors[id(sm.group)], settings.max_batch_size, settings.max_wait_ms / 1000)
                for name, sm in models.items() if sm.task == "sequence-classification"}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for b in batchers.values():
            await b.close()
        for ex in executors.values():
            ex.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lora_ft", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.batchers = batchers

    async def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key; send Authorization: Bearer KEY", "authentication_error")

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error(e.status, e.message, e.kind)

    @app.exception_handler(Exception)
    async def any_error(request, e: Exception):  # a failing request never takes the server down
        return _error(500, f"internal error: {type(e).__name__}: {e}"[:300], "server_error")

    @app.middleware("http")
    async def count(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        endpoint = request.url.path
        latency.labels(endpoint).observe(time.perf_counter() - started)
        requests.labels(endpoint, request.state.model if hasattr(request.state, "model") else "", str(response.status_code)).inc()
        return response

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    def lookup(request: Request, name: str, tasks: tuple[str, ...], endpoint: str) -> ServedModel:
        sm = models.get(name)  # a dict lookup only: request-given names never reach the filesystem
        if sm is None:
            raise ApiError(404, f"model '{name[:100]}' is not served; GET /v1/models lists the served ones", "not_found_error")
        request.state.model = name
        if sm.task not in tasks:
            raise ApiError(400, f"model '{name}' is a {sm.task} model; {endpoint} serves {' and '.join(tasks)}")
        return sm

    def check_texts(texts: list[str], what: str) -> None:
        if len(texts) > settings.max_inputs:
            raise ApiError(413, f"{len(texts)} {what} in one request; the limit is {settings.max_inputs}", "request_too_large")
        if not texts:
            raise ApiError(422, f"no {what} given")
        longest = max(len(t) for t in texts)
        if longest > settings.max_input_chars:
            raise ApiError(413, f"an input of {longest} characters; the limit is {settings.max_input_chars}", "request_too_large")

    async def with_timeout(coro):
        try:
            return await asyncio.wait_for(coro, settings.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"request took over {settings.timeout_s:g} s", "timeout") from None

    async def in_model_thread(sm: ServedModel, fn):
        return await asyncio.get_running_loop().run_in_executor(executors[id(sm.group)], fn)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": len(models)}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def list_models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "lora_ft", "task": m.task}
                                           for n, m in models.items()]}

    @app.post("/v1/classify", dependencies=[Depends(check_key)])
    async def classify_endpoint(body: ClassifyRequest, request: Request):
        lookup(request, body.model, ("sequence-classification",), "/v1/classify")
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        check_texts(texts, "inputs")
        results = await with_timeout(batchers[body.model].submit(texts))
        return {"model": body.model, "results": results}

    def generate_fn(sm: ServedModel, prompt, max_new_tokens: int, temperature: float, seed: Optional[int], streamer=None):
        from ..inference import generate_one

        def run():
            import torch

            with sm.group.lock:
                if seed is not None:
                    torch.manual_seed(seed)
                return generate_one(sm.activate(), sm.tok, prompt, max_new_tokens, temperature, chat=sm.chat,
                                    system_prompt=sm.recipe.args.system_prompt, max_length=sm.recipe.args.max_length,
                                    streamer=streamer)

        return run

    def new_tokens(n: Optional[int]) -> int:
        n = 64 if n is None else n
        if n > settings.max_new_tokens:
            raise ApiError(413, f"max tokens {n} over the server's limit {settings.max_new_tokens}", "request_too_large")
        return n

    @app.post("/v1/generate", dependencies=[Depends(check_key)])
    async def generate_endpoint(body: GenerateRequest, request: Request):
        sm = lookup(request, body.model, ("causal-lm", "seq2seq"), "/v1/generate")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        check_texts(prompts, "prompts")
        n = new_tokens(body.max_new_tokens)

        async def all_prompts():  # in order, each alone: outputs equal `lora-ft generate`
            return [await in_model_thread(sm, generate_fn(sm, p, n, body.temperature, body.seed)) for p in prompts]

        outs = await with_timeout(all_prompts())
        return {"model": body.model, "results": [{"prompt": p, "completion": o["completion"], "stopped": o["stopped"]}
                                                 for p, o in zip(prompts, outs)]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_endpoint(body: ChatRequest, request: Request):
        sm = lookup(request, body.model, ("causal-lm",), "/v1/chat/completions")
        if not sm.chat:
            raise ApiError(400, f"model '{body.model}' was trained without a chat template; use /v1/generate")
        messages = [m.model_dump() for m in body.messages]
        check_texts(["".join(m["content"] for m in messages)], "messages")
        n = new_tokens(body.max_completion_tokens or body.max_tokens)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "created": created, "model": body.model}
        if not body.stream:
            out = await with_timeout(in_model_thread(sm, generate_fn(sm, messages, n, body.temperature, body.seed)))
            usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                     "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}
            return {**head, "object": "chat.completion", "usage": usage, "choices": [{
                "index": 0, "message": {"role": "assistant", "content": out["completion"]},
                "finish_reason": "stop" if out["stopped"] else "length"}]}
        return StreamingResponse(_stream(sm, messages, n, body, head), media_type="text/event-stream")

    async def _stream(sm, messages, n, body, head):
        from transformers import AsyncTextIteratorStreamer

        streamer = AsyncTextIteratorStreamer(sm.tok, skip_prompt=True, skip_special_tokens=True, timeout=settings.timeout_s)
        job = asyncio.ensure_future(in_model_thread(sm, generate_fn(sm, messages, n, body.temperature, body.seed, streamer)))

        def chunk(delta: dict, finish: Optional[str]) -> str:
            return "data: " + json.dumps({**head, "object": "chat.completion.chunk",
                                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

        yield chunk({"role": "assistant", "content": ""}, None)
        sent = ""
        try:
            async for piece in streamer:
                # The completion is stripped as `lora-ft generate` strips it: hold back leading whitespace.
                text = (sent + piece).lstrip()
                if len(text) > len(sent):
                    yield chunk({"content": text[len(sent):]}, None)
                    sent = text
            out = await job
        except Exception as e:
            yield "data: " + json.dumps({"error": {"message": f"{type(e).__name__}: {e}"[:300], "type": "server_error"}}) + "\n\n"
            return
        if out["completion"] != sent.rstrip() and out["completion"].startswith(sent.rstrip()):
            yield chunk({"content": out["completion"][len(sent.rstrip()):]}, None)
        yield chunk({}, "stop" if out["stopped"] else "length")
        yield "data: [DONE]\n\n"

    @app.get("/metrics", dependencies=[Depends(check_key)])
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
