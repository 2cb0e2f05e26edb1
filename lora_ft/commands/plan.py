"""`lora-ft plan RECIPE [--key value ...] [--gpu-memory 24GiB]`: predicted peak memory and a setting that fits."""

from __future__ import annotations

import argparse
import json

HELP = "predict peak training memory for full, LoRA, 8-bit and 4-bit QLoRA and propose a setting that fits"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help=HELP, description=HELP, usage="lora-ft plan [-h] [--gpu-memory SIZE] [--json] RECIPE [--key value ...]")
    p.add_argument("--gpu-memory", "--memory", dest="memory", help="budget, e.g. 24GiB (default: this machine's GPU, else available RAM)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def run(args, overrides: list[str]) -> int:
    import torch
    from transformers import AutoConfig

    from ..config import load_recipe
    from ..errors import RecipeError
    from ..memory import device_memory_gb, head_kind, recipe_mode
    from ..tasks import get_task
    from ..modeling import resolve_model_path
    from ..planner import parse_size, propose, settings_for
    from .train import split_recipe

    path, overrides = split_recipe(overrides)
    if not path and not overrides:
        raise RecipeError(["plan: give a recipe file, e.g. `lora-ft plan recipes/smollm2_sft.yaml --gpu-memory 8GiB`"])
    recipe = load_recipe(path, overrides)
    a = recipe.args
    config = AutoConfig.from_pretrained(resolve_model_path(a.model_name_or_path), trust_remote_code=a.trust_remote_code)
    cuda = torch.cuda.is_available() or bool(args.memory)  # a GPU budget: count no CPU runtime overhead
    where, budget = (f"--gpu-memory {args.memory}", parse_size(args.memory)) if args.memory else device_memory_gb()
    settings = settings_for(recipe, config, cuda)
    mode = recipe_mode(a)
    best = propose(settings, budget, mode)
    if args.json:
        print(json.dumps({"budget_gb": round(budget, 2), "budget_source": where, "task": a.task,
                          "training_pass": head_kind(a.task), "rows": [
            {"mode": s.mode, "batch": s.batch, "accumulation": s.accumulation, "gradient_checkpointing": s.checkpointing,
             "params": s.est.total_params, "trainable_params": s.est.trainable_params, "weights_gb": round(s.est.weights_gb, 6),
             "trainable_state_gb": round(s.est.trainable_gb, 6), "activations_gb": round(s.est.activations_gb, 6),
             "total_gb": round(s.est.total_gb, 6)} for s in settings],
            "proposal": best.overrides() if best else None}, indent=2))
        return 0 if best else 1
    print(f"{a.model_name_or_path}: {settings[0].est.total_params / 1e6:.0f}M parameters, max_length {a.max_length}; budget {budget:.1f} GiB ({where})")
    task = get_task(a.task)
    # what the task trains and how the estimate counts it (a preference method: two sequences and a reference pass)
    print(f"task {a.task}, training pass: {head_kind(a.task)}" + "".join(
        "; " + line.lstrip("- ").replace("**", "") for line in task.card_lines(recipe.to_dict())))
    print(f"{'mode':7s} {'batch x accum':>13s} {'ckpt':>5s} {'weights':>8s} {'train st':>8s} {'activ':>8s} {'total GiB':>9s}  fits")
    for s in settings:
        if s.batch == settings[0].batch or s is best:
            e = s.est
            print(f"{s.mode:7s} {f'{s.batch} x {s.accumulation}':>13s} {'yes' if s.checkpointing else 'no':>5s} {e.weights_gb:8.2f} "
                  f"{e.trainable_gb:8.2f} {e.activations_gb:8.2f} {e.total_gb:9.2f}  {'yes' if e.total_gb <= budget else 'no'}")
    if best is None:
        print("\nnothing fits: use a smaller model or max_length")
        return 1
    print(f"\nproposal ({best.est.total_gb:.2f} GiB, same effective batch): lora-ft train {path or ''} {' '.join(best.overrides())}")
    return 0
