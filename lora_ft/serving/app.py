"""The FastAPI app: classify, token-classify, generate, OpenAI chat completions, model list, health and Prometheus
metrics. Which model answers which route is its task's SERVE_ROUTES."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from ..errors import LoraFtError
from ..tasks import get_task
from .batcher import DynamicBatcher
from .guards import BodyLimit, HostGuard, KeyGuard, accepted_hosts, error_response
from .jobs import Job, JobOver, SeededSampler, StopWhenOver, position_limit
from .registry import ServedModel
from .schemas import ChatRequest, ClassifyRequest, GenerateRequest
from .speed import Speed, grad_off, predict_grouped

log = logging.getLogger("lora_ft.serving")
UNMATCHED = "unmatched"  # one metrics label for every path no route serves: strangers cannot mint series


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
    host: str = "127.0.0.1"  # the bind address: Host headers must name it (or loopback, or allowed_hosts)
    allowed_hosts: tuple[str, ...] = ()  # more Host names to answer; "*" accepts any
    speed: Speed = field(default_factory=Speed)  # inference_mode and length groups here; dtype and backend at load

    def __post_init__(self):
        if self.api_key is not None and not self.api_key.strip():
            raise LoraFtError("serve: the API key is empty (--api-key or $LORA_FT_API_KEY); give a real key, or unset it to serve without one")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def build_app(models: dict[str, ServedModel], settings: ServeSettings = ServeSettings()) -> FastAPI:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

    registry = CollectorRegistry()
    requests = Counter("lora_ft_requests", "requests by endpoint, model and status", ["endpoint", "model", "status"], registry=registry)
    latency = Histogram("lora_ft_request_seconds", "request latency", ["endpoint"], registry=registry)
    batch_hist = Histogram("lora_ft_batch_size", "inputs per classification forward pass", registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128))
    executors = {id(m.group): ThreadPoolExecutor(1, thread_name_prefix="lora-ft-model") for m in models.values()}

    def run_predict(sm: ServedModel):
        task = get_task(sm.task)

        def run(texts: list[str]) -> list[dict]:
            batch_hist.observe(len(texts))
            # task.predict, looked up per batch, is the function `lora-ft predict` calls; grad_off wraps its no_grad
            with sm.group.lock, grad_off(settings.speed):
                rows = predict_grouped(get_task(sm.task), sm.activate(), sm.tok, texts, sm.recipe, settings.speed,
                                       settings.max_batch_size)
            return [{k: r[k] for k in task.SERVE_FIELDS} for r in rows]

        return run

    batchers = {name: DynamicBatcher(run_predict(sm), executors[id(sm.group)], settings.max_batch_size, settings.max_wait_ms / 1000)
                for name, sm in models.items() if get_task(sm.task).predict is not None}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for b in batchers.values():
            await b.close()
        for ex in executors.values():
            ex.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lora_ft", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.batchers = batchers

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.kind)

    @app.exception_handler(Exception)
    async def any_error(request, e: Exception):  # a failing request never takes the server down
        # The text of an exception can hold paths, inputs or model internals: it goes to the log, not the client.
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return error_response(500, "internal error; the server log has the details", "server_error")

    @app.middleware("http")
    async def count(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", None) or UNMATCHED
        latency.labels(endpoint).observe(time.perf_counter() - started)
        requests.labels(endpoint, request.state.model if hasattr(request.state, "model") else "", str(response.status_code)).inc()
        return response

    # The last added runs first: Host, then key, then body size, then the routes.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(KeyGuard, api_key=settings.api_key)
    app.add_middleware(HostGuard, allowed=accepted_hosts(settings.host, settings.allowed_hosts))

    def lookup(request: Request, name: str, endpoint: str) -> ServedModel:
        sm = models.get(name)  # a dict lookup only: request-given names never reach the filesystem
        if sm is None:
            raise ApiError(404, f"model '{name[:100]}' is not served; GET /v1/models lists the served ones", "not_found_error")
        request.state.model = name
        routes = get_task(sm.task).SERVE_ROUTES
        if endpoint not in routes:
            raise ApiError(400, f"model '{name}' is a {sm.task} model; {endpoint} does not serve it (use {' or '.join(routes)})")
        return sm

    def check_texts(texts: list[str], what: str) -> None:
        if len(texts) > settings.max_inputs:
            raise ApiError(413, f"{len(texts)} {what} in one request; the limit is {settings.max_inputs}", "request_too_large")
        if not texts:
            raise ApiError(422, f"no {what} given")
        longest = max(len(t) for t in texts)
        if longest > settings.max_input_chars:
            raise ApiError(413, f"an input of {longest} characters; the limit is {settings.max_input_chars}", "request_too_large")

    async def with_timeout(coro, job: Optional[Job] = None):
        try:
            return await asyncio.wait_for(coro, settings.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"request took over {settings.timeout_s:g} s", "timeout") from None
        finally:
            if job is not None:  # the worker thread cannot be cancelled; it stops at its next step
                job.cancel()

    async def in_model_thread(sm: ServedModel, fn):
        return await asyncio.get_running_loop().run_in_executor(executors[id(sm.group)], fn)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": len(models)}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "lora_ft", "task": m.task}
                                           for n, m in models.items()]}

    async def batched(body: ClassifyRequest, request: Request, endpoint: str):
        lookup(request, body.model, endpoint)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        check_texts(texts, "inputs")
        results = await with_timeout(batchers[body.model].submit(texts))
        return {"model": body.model, "results": results}

    @app.post("/v1/classify")
    async def classify_endpoint(body: ClassifyRequest, request: Request):
        return await batched(body, request, "/v1/classify")

    @app.post("/v1/token-classify")
    async def token_classify_endpoint(body: ClassifyRequest, request: Request):
        return await batched(body, request, "/v1/token-classify")

    def generate_fn(sm: ServedModel, prompt, max_new_tokens: int, temperature: float, seed: Optional[int], job: Job,
                    streamer=None):
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from .. import inference

        def run():
            if job.over:  # its client left or its time ran out while it waited for the model thread
                raise JobOver()
            try:
                with sm.group.lock:
                    model = sm.activate()
                    sampler = [SeededSampler(temperature, seed, model.generation_config)] if temperature > 0 else None
                    # temperature 0 below: the sampler has already picked the token, greedy decoding takes it.
                    return inference.generate_one(
                        model, sm.tok, prompt, max_new_tokens, 0.0, chat=sm.chat, system_prompt=sm.recipe.args.system_prompt,
                        max_length=sm.recipe.args.max_length, streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([StopWhenOver(job)]),
                        logits_processor=LogitsProcessorList(sampler) if sampler else None)
            except BaseException:
                if streamer is not None:  # the stream ends now, not after the streamer's timeout
                    streamer.end()
                raise

        return run

    def fits_fn(sm: ServedModel, prompts: list, max_new_tokens: int):
        """Prompt plus new tokens within the model's positions (in the model thread: it owns the tokenizer)."""
        from ..inference import render_prompt

        def run():
            limit = position_limit(sm.group.model)
            if limit is None:
                return
            for p in prompts:
                k = len(render_prompt(sm.tok, p, sm.chat, sm.recipe.args.system_prompt))
                if k + max_new_tokens > limit:
                    raise ApiError(413, f"a prompt of {k} tokens plus {max_new_tokens} new tokens is over the model's "
                                        f"{limit} positions; shorten the prompt or ask for fewer tokens", "request_too_large")

        return run

    def new_tokens(n: Optional[int]) -> int:
        n = 64 if n is None else n
        if n > settings.max_new_tokens:
            raise ApiError(413, f"max tokens {n} over the server's limit {settings.max_new_tokens}", "request_too_large")
        return n

    @app.post("/v1/generate")
    async def generate_endpoint(body: GenerateRequest, request: Request):
        sm = lookup(request, body.model, "/v1/generate")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        check_texts(prompts, "prompts")
        n = new_tokens(body.max_new_tokens)
        job = Job()

        async def all_prompts():  # in order, each alone: outputs equal `lora-ft generate`
            await in_model_thread(sm, fits_fn(sm, prompts, n))
            return [await in_model_thread(sm, generate_fn(sm, p, n, body.temperature, body.seed, job)) for p in prompts]

        outs = await with_timeout(all_prompts(), job)
        return {"model": body.model, "results": [{"prompt": p, "completion": o["completion"], "stopped": o["stopped"]}
                                                 for p, o in zip(prompts, outs)]}

    @app.post("/v1/chat/completions")
    async def chat_endpoint(body: ChatRequest, request: Request):
        sm = lookup(request, body.model, "/v1/chat/completions")
        if not sm.chat:
            raise ApiError(400, f"model '{body.model}' was trained without a chat template; use /v1/generate")
        messages = [m.model_dump() for m in body.messages]
        check_texts(["".join(m["content"] for m in messages)], "messages")
        n = new_tokens(body.max_completion_tokens or body.max_tokens)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "created": created, "model": body.model}
        await with_timeout(in_model_thread(sm, fits_fn(sm, [messages], n)))
        if not body.stream:
            job = Job()
            out = await with_timeout(in_model_thread(sm, generate_fn(sm, messages, n, body.temperature, body.seed, job)), job)
            usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                     "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}
            return {**head, "object": "chat.completion", "usage": usage, "choices": [{
                "index": 0, "message": {"role": "assistant", "content": out["completion"]},
                "finish_reason": "stop" if out["stopped"] else "length"}]}
        job = Job()  # a stream ends when its client goes or a token is overdue, not at --timeout as a whole
        return CancelOnClose(_stream(sm, messages, n, body, head, job), job, media_type="text/event-stream")

    async def _stream(sm, messages, n, body, head, job: Job):
        from transformers import AsyncTextIteratorStreamer

        streamer = AsyncTextIteratorStreamer(sm.tok, skip_prompt=True, skip_special_tokens=True, timeout=settings.timeout_s)
        work = asyncio.ensure_future(in_model_thread(sm, generate_fn(sm, messages, n, body.temperature, body.seed, job, streamer)))

        def chunk(delta: dict, finish: Optional[str]) -> str:
            return "data: " + json.dumps({**head, "object": "chat.completion.chunk",
                                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

        sent = ""
        try:
            yield chunk({"role": "assistant", "content": ""}, None)
            async for piece in streamer:
                # The completion is stripped as `lora-ft generate` strips it: hold back leading whitespace.
                text = (sent + piece).lstrip()
                if len(text) > len(sent):
                    yield chunk({"content": text[len(sent):]}, None)
                    sent = text
            out = await work
        except JobOver:  # its client is gone: nobody to tell
            return
        except asyncio.TimeoutError:
            msg = f"no token for {settings.timeout_s:g} s; generation stopped"
            yield "data: " + json.dumps({"error": {"message": msg, "type": "timeout"}}) + "\n\n"
            return
        except Exception as e:
            log.error("chat stream failed", exc_info=e)
            msg = "generation failed; the server log has the details"
            yield "data: " + json.dumps({"error": {"message": msg, "type": "server_error"}}) + "\n\n"
            return
        finally:
            job.cancel()
            work.cancel()
        if out["completion"] != sent.rstrip() and out["completion"].startswith(sent.rstrip()):
            yield chunk({"content": out["completion"][len(sent.rstrip()):]}, None)
        yield chunk({}, "stop" if out["stopped"] else "length")
        yield "data: [DONE]\n\n"

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


class CancelOnClose(StreamingResponse):
    """However the response ends (done, client gone, send failed), its generation job is cancelled."""

    def __init__(self, content, job: Job, **kw):
        super().__init__(content, **kw)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()
