"""Hyperparameter search with optuna: TPE sampling, median pruning on intermediate evals, resumable from SQLite.

Each trial is an ordinary run dir (PARENT/trial-000, ...) trained by `train()`; the study lives in PARENT/search.db,
so an interrupted search continues where it stopped. The best trial's recipe is written to PARENT/best_recipe.yaml.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LoraFtError, RecipeError
from .outputs import check_output
from .runs import write_json

SEARCH_DB = "search.db"

# The fallback space is each task module's SEARCH_SPACE; shipped recipes name their own with `search_space:`.
DIST = re.compile(r"^(\w+)=(loguniform|uniform|int|choice)\((.*)\)$")


@dataclass
class Param:
    key: str
    kind: str
    args: list


def _num(text: str):
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text.strip("'\"")


def parse_space(text: str) -> list[Param]:
    """'learning_rate=loguniform(1e-5,1e-3) lora_r=choice(8,16,32) warmup_steps=uniform(0,0.2) lora_alpha=int(8,64)'."""
    params = []
    for item in text.split():
        m = DIST.match(item)
        if not m:
            raise RecipeError([f"--space: '{item}' is not KEY=loguniform(lo,hi) | uniform(lo,hi) | int(lo,hi) | choice(a,b,...)"])
        key, kind, inner = m.groups()
        args = [_num(x) for x in inner.split(",") if x.strip()]
        if kind != "choice" and (len(args) != 2 or not all(isinstance(x, (int, float)) for x in args) or args[0] >= args[1]):
            raise RecipeError([f"--space: {key}={kind}(...) needs two numbers lo < hi"])
        if kind == "loguniform" and args[0] <= 0:
            raise RecipeError([f"--space: {key}=loguniform needs lo > 0"])
        if kind == "choice" and not args:
            raise RecipeError([f"--space: {key}=choice() needs at least one value"])
        params.append(Param(key, kind, args))
    if not params:
        raise RecipeError(["--space: empty; give KEY=DIST(...) pairs separated by spaces"])
    return params


def suggest(trial, params: list[Param]) -> dict[str, Any]:
    out = {}
    for p in params:
        if p.kind == "loguniform":
            out[p.key] = trial.suggest_float(p.key, p.args[0], p.args[1], log=True)
        elif p.kind == "uniform":
            out[p.key] = trial.suggest_float(p.key, p.args[0], p.args[1])
        elif p.kind == "int":
            out[p.key] = trial.suggest_int(p.key, int(p.args[0]), int(p.args[1]))
        else:
            out[p.key] = trial.suggest_categorical(p.key, p.args)
    return out


def pruning_callback(trial, metric: str):
    """Report each intermediate eval to optuna and stop the trial when the pruner says so."""
    import optuna
    from transformers import TrainerCallback

    class Report(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kw):
            value = (metrics or {}).get(metric)
            if value is None:
                return
            trial.report(float(value), step=state.global_step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric}={value:.4f} at step {state.global_step}")

    return Report()


def run_search(raw: dict, parent: Path, n_trials: int, space: str | None, metric: str | None, direction: str | None,
               seed: int = 0, log=print, overwrite: bool = False) -> dict:
    import optuna

    from .config import resolve, save_recipe
    from .train import train

    base = resolve(dict(raw))
    task = base.args.task
    from .tasks import get_task

    metric = metric or get_task(task).SELECT_METRIC
    direction = direction or ("minimize" if metric.endswith("loss") or "perplexity" in metric else "maximize")
    params = parse_space(space or base.args.search_space or get_task(task).SEARCH_SPACE)
    for p in params:  # every searched key must be a recipe key of the right type: check one sample now, not mid-search
        resolve({**raw, p.key: p.args[0]})
    if not base.args.eval_split:
        raise RecipeError(["search: the recipe has eval_split: none; trials are compared on eval metrics"])
    data = Path(str(base.args.dataset_name or ""))
    # A search folder is resumed in place (its study lives in search.db), so it is checked, not swapped.
    check_output(parent, SEARCH_DB, sources=[data] if data.exists() else [], overwrite=overwrite, what="search: output_dir")
    parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{parent / SEARCH_DB}"
    study = optuna.create_study(study_name="lora_ft", storage=storage, load_if_exists=True, direction=direction,
                                sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, n_trials)),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    stale = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for t in stale:  # an interrupted search: the trial that was running is failed and re-run as a new one
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    done = sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials)
    if done:
        log(f"[lora_ft] search: resuming {parent}: {done} trial(s) already finished")

    def objective(trial):
        values = suggest(trial, params)
        run_dir = parent / f"trial-{trial.number:03d}"
        recipe = resolve({**raw, **values, "output_dir": str(run_dir)})
        log(f"[lora_ft] trial {trial.number} ({done_count() + 1}/{n_trials}): " + " ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
        train(recipe, callbacks=[pruning_callback(trial, metric)])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if metric not in metrics:
            raise LoraFtError(f"search: metric {metric} not in {run_dir}/metrics.json; pass --metric (one of: "
                              f"{', '.join(k for k in metrics if k.startswith('eval_'))})")
        value = float(metrics[metric])
        log(f"[lora_ft] trial {trial.number}: {metric}={value:.4f}")
        return value

    def done_count():
        return sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials)

    remaining = max(n_trials - done, 0)
    if remaining:
        study.optimize(objective, n_trials=remaining, catch=(), callbacks=[_log_pruned(log)])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise LoraFtError(f"search: no trial finished in {parent}; see the trial logs above")
    best = study.best_trial
    best_recipe = resolve({**raw, **best.params, "output_dir": str(parent / "best")})
    save_recipe(best_recipe, parent)
    (parent / "lora_ft_recipe.yaml").rename(parent / "best_recipe.yaml")
    summary = {"metric": metric, "direction": direction, "best_trial": best.number, "best_value": best.value, "best_params": best.params,
               "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                           "run_dir": str(parent / f"trial-{t.number:03d}")} for t in study.trials]}
    write_json(parent / "search_summary.json", summary)
    (parent / "best_recipe.yaml").write_text((parent / "best_recipe.yaml").read_text() + "\n# best of " +
                                             f"{len(study.trials)} trials: {metric}={best.value:.4f}\n")
    return summary


def _log_pruned(log):
    import optuna

    def cb(study, trial):
        if trial.state == optuna.trial.TrialState.PRUNED:
            log(f"[lora_ft] trial {trial.number}: pruned (worse than the median of earlier trials at the same step)")

    return cb


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) and not math.isnan(v) else str(v)
