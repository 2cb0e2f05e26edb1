"""`lora-ft doctor RECIPE [--key value ...]`: pre-flight checks in seconds, no weights loaded; exit 1 on a failing one."""

from __future__ import annotations

import argparse

HELP = "check a recipe, its model config, tokenizer and data for known traps before training (no weights loaded)"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("doctor", help=HELP, description=HELP,
                       usage="lora-ft doctor [-h] RECIPE [--accelerate_config FILE] [--key value ...]")
    p.add_argument("--accelerate_config", metavar="FILE",
                   help="check the recipe for this launch (recipes/accelerate/*.yaml): its engine on this machine")
    return p


def run(args, overrides: list[str]) -> int:
    from ..config import load_recipe
    from ..doctor import FAIL, Check, blocking, run_doctor
    from ..errors import RecipeError
    from .train import split_recipe

    path, overrides = split_recipe(overrides)
    if not path and not overrides:
        raise RecipeError(["doctor: give a recipe file, e.g. `lora-ft doctor recipes/quickstart.yaml`"])
    from ..engines import from_accelerate_config

    engine = from_accelerate_config(args.accelerate_config) if args.accelerate_config else None
    try:
        checks = run_doctor(load_recipe(path, overrides), engine)
    except RecipeError as e:  # every recipe problem is a failed check of its own
        checks = [Check("recipe", FAIL, p) for p in e.problems]
    print(f"{'check':22s} {'status':6s} detail")
    for c in checks:
        print(c.line())
    failed = blocking(checks)
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks without failure" + (f"; fix the {len(failed)} failing before training" if failed else ""))
    return 1 if failed else 0
