"""`lora-ft train RECIPE [--key value ...]` (also `accelerate launch scripts/sft.py RECIPE ...`)."""

from __future__ import annotations

import argparse

HELP = "fine-tune a model from a YAML recipe; --key value overrides any recipe key"


def add_parser(sub) -> argparse.ArgumentParser:
    # RECIPE is read from the leftover arguments rather than declared: a declared optional positional takes the
    # value of the first `--key value` override (`lora-ft train --model_name_or_path m ...` read m as the recipe).
    p = sub.add_parser("train", help=HELP, description=HELP, usage="lora-ft train [-h] [--help-keys] [RECIPE] [--key value ...]",
                       epilog="RECIPE: YAML recipe (see recipes/); without one, the overrides must give every required key")
    p.add_argument("--help-keys", action="store_true", help="list every lora_ft recipe key with its default")
    p.add_argument("--overwrite", action="store_true", help="replace a run of a different recipe in output_dir (else refused)")
    return p


def split_recipe(rest: list[str]) -> tuple[str | None, list[str]]:
    """(recipe path or None, overrides): the recipe is the first argument when it is not a --key."""
    if rest and not rest[0].startswith("-"):
        return rest[0], rest[1:]
    return None, rest


def run(args, overrides: list[str]) -> int:
    if args.help_keys:
        from ..config import OUR_FIELDS, TRAINER_DEFAULTS

        for name, f in OUR_FIELDS.items():
            print(f"{name:28s} {f.metadata['help']}  [default: {f.default if f.default is not None else '-'}]")
        print("\nplus every transformers TrainingArguments key; lora_ft's defaults for them:")
        for k, v in TRAINER_DEFAULTS.items():
            print(f"{k:28s} {v}")
        return 0
    from ..config import load_recipe
    from ..errors import RecipeError

    path, overrides = split_recipe(overrides)
    if not path and not overrides:
        raise RecipeError(["train: give a recipe file, e.g. `lora-ft train recipes/quickstart.yaml`"])
    from ..train import train

    recipe = load_recipe(path, overrides)
    train(recipe, overwrite=args.overwrite)  # a flag, never a recipe key: a saved recipe must not replace runs
    return 0

