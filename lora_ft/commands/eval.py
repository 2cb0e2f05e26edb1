"""`lora-ft eval RUN_DIR [--dataset_name D] [--split S] [--text_column C] [--label_column L]`: prints metrics JSON."""

from __future__ import annotations

import argparse
import json

from ..trust import add_trust_args

HELP = "evaluate a trained run on its eval split or on other data; prints metrics JSON"
# Recipe keys an eval may override: where the data is and how it is laid out, never the model.
DATA_KEYS = ("dataset_name", "dataset_config", "text_column", "text_pair_column", "label_column", "max_eval_samples",
             "column_map", "source_template", "target_column", "dataset_format", "max_length", "tokens_column", "tags_column",
             "tag_scheme")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help=HELP, description=HELP)
    p.add_argument("run_dir")
    p.add_argument("--split", help="split to score (default: the recipe's eval_split)")
    p.add_argument("--output", help="also write the metrics JSON here")
    add_trust_args(p)
    return p


def run(args, overrides: list[str]) -> int:
    from dataclasses import replace

    from ..config import load_run_recipe, parse_overrides, resolve
    from ..errors import RecipeError
    from ..inference import load_run
    from ..trust import from_args
    from ..tasks import get_task

    extra = parse_overrides(overrides)
    bad = [k for k in extra if k not in DATA_KEYS]
    if bad:
        raise RecipeError([f"--{k}: eval takes only data keys ({', '.join(DATA_KEYS)})" for k in bad])
    load_run_recipe(args.run_dir)  # fail on a bad run dir before loading weights
    model, tok, recipe = load_run(args.run_dir, from_args(args))
    if set(extra) & {"text_column", "text_pair_column", "label_column", "tokens_column", "tags_column"} and "column_map" not in extra:
        extra["column_map"] = {}  # columns named on the command line are the data's own names: no recipe renames
    if extra:
        merged = resolve({**recipe.to_dict(), **extra}, source=recipe.source)
        recipe = replace(recipe, args=merged.args)
    metrics = get_task(recipe.args.task).evaluate_run(model, tok, recipe, args.split)
    text = json.dumps(metrics, indent=2, ensure_ascii=False)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0
