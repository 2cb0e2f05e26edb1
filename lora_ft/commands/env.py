"""`lora-ft env [--json]`: versions, CPU and CUDA, the precision a run would take, lora_ft's fast paths."""

from __future__ import annotations

import argparse

HELP = "print the environment for a bug report: versions, CPU capability, CUDA, precision, fast paths"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("env", help=HELP, description=HELP)
    p.add_argument("--json", action="store_true", help="one JSON document instead of text")
    return p


def run(args, overrides: list[str]) -> int:
    from ..errors import RecipeError

    if overrides:
        raise RecipeError([f"env: unexpected argument '{overrides[0]}'; it takes only --json"])
    from ..envreport import main

    return main(args.json)
