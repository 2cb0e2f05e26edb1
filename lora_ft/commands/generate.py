"""`lora-ft generate RUN_DIR --prompt TEXT [--prompt ...] [--max_new_tokens N] [--temperature T]`."""

from __future__ import annotations

import argparse
import json

from ..trust import add_trust_args

HELP = "generate with a causal-LM or seq2seq run; one JSON line {prompt, completion} per prompt"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help=HELP, description=HELP)
    p.add_argument("run_dir")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); a chat run wraps it as one user turn")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    add_trust_args(p)
    return p


def run(args, overrides: list[str]) -> int:
    from ..errors import LoraFtError
    from ..inference import generate_texts, load_run
    from ..trust import from_args

    if overrides:
        raise LoraFtError(f"generate: unknown option(s) {' '.join(overrides)}; see `lora-ft generate --help`")
    if not args.prompt:
        raise LoraFtError("generate: no input; pass --prompt TEXT")
    if args.max_new_tokens <= 0 or args.temperature < 0:
        raise LoraFtError("generate: --max_new_tokens must be positive and --temperature >= 0")
    model, tok, recipe = load_run(args.run_dir, from_args(args))
    a = recipe.args
    from ..tasks import get_task

    if not get_task(a.task).GENERATES:
        raise LoraFtError(f"generate: {args.run_dir} is a {a.task} run; use `lora-ft predict`")
    # A seq2seq prompt is the whole source text, as source_template rendered it in training (cut at max_length).
    outs = generate_texts(model, tok, args.prompt, args.max_new_tokens, args.temperature, chat=bool(a.use_chat_template),
                          system_prompt=a.system_prompt, seed=args.seed, max_length=a.max_length)
    for p, o in zip(args.prompt, outs):
        print(json.dumps({"prompt": p, "completion": o["completion"]}, ensure_ascii=False), flush=True)
    return 0
