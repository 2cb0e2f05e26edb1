"""`lora-ft serve RUN [NAME=RUN ...] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--allowed-hosts H,...] [--max-batch-size 32]
[--backend torch|onnx] [--dtype auto|bfloat16|float32|int8] [--no-merge] [--no-inference-mode] [--no-group-by-length] [--threads N] [--task T]`."""

from __future__ import annotations

import argparse
import os
import sys

from ..serving.speed import BACKENDS, DTYPES, Speed
from ..tasks import TASKS
from ..trust import add_trust_args

HELP = "serve runs and merged models over REST: classify, generate, OpenAI chat completions"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help=HELP, description=HELP)
    p.add_argument("models", nargs="+", metavar="RUN",
                   help="run dir, merged folder or plain HF model folder; NAME=PATH names it (default: folder name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allowed-hosts", default="", metavar="H[,H...]",
                   help="Host header names to answer besides loopback and the bind address ('*': any, e.g. behind a proxy)")
    p.add_argument("--api-key", default=os.environ.get("LORA_FT_API_KEY"), help="require Authorization: Bearer KEY (default: $LORA_FT_API_KEY)")
    p.add_argument("--max-batch-size", type=int, default=32, help="inputs per classification forward pass; 1 turns batching off")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a request answers 504")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-inputs", type=int, default=256, help="texts or prompts per request")
    p.add_argument("--max-input-chars", type=int, default=20_000)
    p.add_argument("--max-new-tokens", type=int, default=1024, help="the most tokens a request may ask for")
    speed = Speed()  # the defaults' one home; lora_ft/serving/speed.py says what each lever does
    p.add_argument("--backend", choices=BACKENDS, default=speed.backend,
                   help="torch, or onnx: onnxruntime runs a merged labelling model (exported and verified at start)")
    p.add_argument("--dtype", choices=DTYPES, default=speed.dtype,
                   help="weights of labelling models; auto: bfloat16 where the CPU has AMX or AVX512-BF16, else float32; int8: the "
                        "base's Linear layers dynamically quantized (lossy, for AVX2-only CPUs)")
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=speed.merge,
                   help="merge a labelling run that has its base to itself into it at load, in memory (--no-merge: keep the adapter)")
    p.add_argument("--inference-mode", action=argparse.BooleanOptionalAction, default=speed.inference_mode,
                   help="torch.inference_mode around every forward (--no-inference-mode: no_grad)")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=speed.group_by_length,
                   help="split a batch into runs of similar token counts where that saves padding")
    p.add_argument("--threads", type=int, default=speed.threads, help="torch / onnxruntime intra-op threads (0: one per core)")
    p.add_argument("--task", choices=TASKS, help="task of plain HF model folders (default: from config.json architectures)")
    add_trust_args(p)
    return p


def run(args, overrides: list[str]) -> int:
    from ..errors import LoraFtError

    if overrides:
        raise LoraFtError(f"serve: unknown option(s) {' '.join(overrides)}; see `lora-ft serve --help`")
    if min(args.max_batch_size, args.max_inputs, args.max_input_chars, args.max_new_tokens, args.max_body_bytes) < 1 or args.timeout <= 0:
        raise LoraFtError("serve: limits (--max-*, --timeout) must be positive")
    import uvicorn

    from ..serving.app import ServeSettings, build_app
    from ..serving.registry import load_models
    from ..serving.speed import apply_threads
    from ..trust import from_args

    hosts = tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
    speed = Speed(dtype=args.dtype, merge=args.merge, inference_mode=args.inference_mode, group_by_length=args.group_by_length,
                  threads=args.threads, backend=args.backend)
    settings = ServeSettings(api_key=args.api_key, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                             timeout_s=args.timeout, max_body_bytes=args.max_body_bytes, max_inputs=args.max_inputs,
                             max_input_chars=args.max_input_chars, max_new_tokens=args.max_new_tokens,
                             host=args.host, allowed_hosts=hosts, speed=speed)
    apply_threads(speed)
    models = load_models(args.models, from_args(args), speed, args.task)
    if args.host not in LOOPBACK and not args.api_key:
        print(f"lora-ft: warning: serving on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    for name, m in models.items():
        how = f"{'onnxruntime' if speed.backend == 'onnx' else 'torch'} {m.group.dtype}"
        print(f"[lora_ft] serving {name} ({m.task}, {how}) from {m.path}", file=sys.stderr)
    print(f"[lora_ft] listening on http://{args.host}:{args.port} (Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(build_app(models, settings), host=args.host, port=args.port, log_level="warning")
    return 0
