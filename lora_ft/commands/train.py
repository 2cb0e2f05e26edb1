"""`lora-ft train RECIPE [--key value ...]` (also `accelerate launch scripts/sft.py RECIPE ...`)."""

from __future__ import annotations

import argparse

HELP = "fine-tune a model from a YAML recipe; --key value overrides any recipe key"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help=HELP, description=HELP)
    p.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/)")
    p.add_argument("--help-keys", action="store_true", help="list every lora_ft recipe key with its default")
    return p


def run(args, overrides: list[str]) -> int:
    if args.help_keys:
        from ..config import OUR_FIELDS, TRAINER_DEFAULTS

        for name, f in OUR_FIELDS.items():
            print(f"{name:28s} {f.metadata['help']}  [default: {f.default if f.default is not None else '-'}]")
        print("\nplus every transformers TrainingArguments key; lora_ft's defaults for them:")
        for k, v in TRAINER_DEFAULTS.items():
            print(f"{k:28s} {v}")
        return 0
    if not args.recipe and not overrides:
        raise SystemExit("lora-ft train: give a recipe file, e.g. `lora-ft train recipes/quickstart.yaml`")
    from ..config import load_recipe
    from ..train import train

    recipe = load_recipe(args.recipe, overrides)
    train(recipe)
    return 0
