"""`lora-ft search RECIPE [--key value ...] --n-trials N [--space "..."] [--metric M] [--output_dir PARENT]`."""

from __future__ import annotations

import argparse

HELP = "hyperparameter search with optuna (TPE + median pruning); each trial is a run dir; resumable"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("search", help=HELP, description=HELP,
                       usage="lora-ft search [-h] [--n-trials N] [--space SPACE] [--metric M] [--direction D] RECIPE [--key value ...]")
    p.add_argument("--n-trials", type=int, default=20, help="trials in total (an interrupted search counts the finished ones)")
    p.add_argument("--space", help='e.g. "learning_rate=loguniform(1e-5,1e-3) lora_r=choice(8,16,32)" (default: the recipe\'s search_space)')
    p.add_argument("--metric", help="metrics.json key to optimize (default: eval_accuracy, eval_f1 or eval_loss by task)")
    p.add_argument("--direction", choices=["maximize", "minimize"], help="default: minimize for losses, else maximize")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--overwrite", action="store_true", help="search into an existing output_dir that is not a `lora-ft search` folder")
    return p


def run(args, overrides: list[str]) -> int:
    from pathlib import Path

    from ..config import load_recipe, parse_overrides, read_recipe_file
    from ..errors import RecipeError
    from ..search import run_search
    from .train import split_recipe

    path, overrides = split_recipe(overrides)
    if not path and not overrides:
        raise RecipeError(["search: give a recipe file, e.g. `lora-ft search recipes/quickstart.yaml --n-trials 10`"])
    if args.n_trials < 1:
        raise RecipeError(["--n-trials: must be at least 1"])
    raw = read_recipe_file(path) if path else {}
    raw.update(parse_overrides(overrides))
    recipe = load_recipe(path, overrides)  # every recipe problem reported before the first trial
    parent = Path(recipe.trainer["output_dir"])
    raw.pop("output_dir", None)
    summary = run_search(raw, parent, args.n_trials, args.space, args.metric, args.direction, args.seed, overwrite=args.overwrite)
    print(f"best trial {summary['best_trial']}: {summary['metric']}={summary['best_value']:.4f} "
          f"{summary['best_params']}; recipe: {parent / 'best_recipe.yaml'}; all trials: {parent / 'search_summary.json'}")
    return 0
