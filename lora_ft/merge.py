"""Verified merge: adapter + full-precision base -> one plain model, checked numerically before it is kept.

The base is always reloaded in full precision, also for QLoRA runs: merging into 4-bit weights is the known
source of degraded merged models. The merged model is compared with the adapter model on held-out inputs
(max |logit| difference, argmax agreement, the task metric both ways); outside tolerance nothing is kept.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Optional

from .config import RECIPE_FILE, load_run_recipe
from .errors import LoraFtError
from .outputs import check_output, output_dir
from .runs import require_run_dir, write_json
from .trust import NONE, Trust, granted

REPORT_FILE = "merge_report.json"
N_VERIFY = 64
# (atol, rtol) on logits by saved dtype; agreement floor on argmax/greedy tokens.
TOLERANCE = {"float32": (1e-3, 1e-4, 1.0), "bfloat16": (0.1, 0.02, 0.97), "float16": (0.02, 0.005, 0.99)}


class MergeCheckFailed(LoraFtError):
    """The merged model does not reproduce the adapter model within tolerance."""


def verification_inputs(run_dir: Path, task: str, given: Optional[list[str]], n: int = N_VERIFY) -> tuple[list, list]:
    """(inputs, references) from the run's own eval outputs (the task says which), or the texts the user gave."""
    from .tasks import get_task

    if given:
        return given[:n], []
    return get_task(task).verify_inputs(run_dir, n)


def _fingerprint(run_dir: Path, dtype: str, inputs: list[str]) -> str:
    h = hashlib.sha256()
    for name in ("adapter_model.safetensors", "adapter_config.json", RECIPE_FILE):
        p = run_dir / name
        h.update(p.read_bytes() if p.is_file() else b"-")
    h.update(dtype.encode())
    h.update(json.dumps(inputs).encode())
    return h.hexdigest()


def _check_dtype(dtype: str) -> None:
    """Before any loading: an unknown dtype would otherwise surface as a KeyError deep in model loading."""
    if dtype not in TOLERANCE:
        raise LoraFtError(f"merge: --dtype {dtype} is not one of {', '.join(TOLERANCE)}")


def _up_to_date(out: Path, fingerprint: str, force: bool) -> bool:
    """Same inputs as the merge already in `out`. A model kept with --force failed verification: without
    --force it is checked again (and fails again, loudly) rather than passed off as up to date."""
    old = out / REPORT_FILE
    if not (old.is_file() and (out / "config.json").is_file()):
        return False
    report = json.loads(old.read_text())
    return report.get("fingerprint") == fingerprint and (report.get("status") == "ok" or force)


def _load(run_dir: Path, recipe, dtype: str, quantized: bool):
    """The trained adapter on a base loaded either full precision in `dtype` or as trained (quantized)."""
    from peft import PeftModel

    from .modeling import load_model
    from .tasks import auto_class, get_task

    a = recipe.args
    task = get_task(a.task)
    args = a if quantized else replace(a, load_in_4bit=False, load_in_8bit=False, dtype=dtype)
    extra = task.reload_kwargs(a)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run_dir), trust_remote_code=a.trust_remote_code)
    model, _ = load_model(args, auto_class(task), training=False, **extra)
    task.setup_model(model, tok)
    model = PeftModel.from_pretrained(model, str(run_dir))
    model.eval()
    return model, tok


def _logits(model, tok, inputs: list, args) -> list:
    """Per-input logits through the task's own inference encoding: what predict / generate give the model."""
    from .tasks import get_task

    return get_task(args.task).verify_logits(model, tok, inputs, args)


def _compare(ref, new) -> dict:
    diffs = [float((a - b).abs().max()) for a, b in zip(ref, new)]
    scale = max(float(a.abs().max()) for a in ref)
    agree = [float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(ref, new)]
    return {"max_abs_logit_diff": max(diffs), "mean_max_abs_logit_diff": sum(diffs) / len(diffs),
            "logit_scale": scale, "argmax_agreement": sum(agree) / len(agree)}


def _metric(logits, refs, args) -> tuple[Optional[str], Optional[float]]:
    """The task metric against the eval references (accuracy for classifiers), or (None, None)."""
    from .tasks import get_task

    got = get_task(args.task).verify_metric(logits, refs, args)
    return got if got is not None else (None, None)


def merge_run(run_dir: str, output: str, dtype: str = "float32", force: bool = False,
              inputs: Optional[list[str]] = None, overwrite: bool = False, trust: Trust = NONE) -> dict:
    run = require_run_dir(run_dir)
    if not (run / "adapter_config.json").is_file():
        raise LoraFtError(f"merge: {run_dir} holds a full model (use_peft: false); there is nothing to merge")
    _check_dtype(dtype)
    out = Path(output)
    check_output(out, REPORT_FILE, sources=[run], overwrite=overwrite, what="merge: --output")  # before any weights load
    recipe = granted(load_run_recipe(run), trust, run)
    a = recipe.args
    texts, refs = verification_inputs(run, a.task, inputs)
    fp = _fingerprint(run, dtype, texts)
    if _up_to_date(out, fp, force):
        report = json.loads((out / REPORT_FILE).read_text())
        report["status"] = "up to date (no-op)"
        return report

    # 1. the adapter on a full-precision base, before merging: the reference
    model, tok = _load(run, recipe, dtype, quantized=False)
    ref = _logits(model, tok, texts, a)
    merged = model.merge_and_unload()
    new = _logits(merged, tok, texts, a)
    check = _compare(ref, new)
    atol, rtol, floor = TOLERANCE[dtype]
    tol = atol + rtol * check["logit_scale"]
    report = {"run_dir": str(run), "output": str(out), "dtype": dtype, "task": a.task, "n_inputs": len(texts),
              "base_model": a.model_name_or_path, "trained_quantized": bool(a.load_in_4bit or a.load_in_8bit),
              "adapter_vs_merged": check, "tolerance": {"max_abs_logit_diff": tol, "argmax_agreement": floor},
              "fingerprint": fp}
    name, adapter_score = _metric(ref, refs, a)
    report["metric"] = {"name": name, "adapter": adapter_score, "merged": _metric(new, refs, a)[1]}
    problems = []
    if check["max_abs_logit_diff"] > tol:
        problems.append(f"max |logit diff| {check['max_abs_logit_diff']:.3g} > tolerance {tol:.3g}")
    if check["argmax_agreement"] < floor:
        problems.append(f"argmax agreement {check['argmax_agreement']:.3f} < {floor}")
    if report["trained_quantized"]:
        # 2. what the user trained: the same adapter on the quantized base. The merged model drops the
        # quantization error the adapter learned around; report the difference so it is never silent.
        qmodel, _ = _load(run, recipe, dtype, quantized=True)
        qlog = _logits(qmodel, tok, texts, a)
        report["trained_quantized_vs_merged"] = _compare(qlog, new)
        report["metric"]["trained_quantized"] = _metric(qlog, refs, a)[1]
        m = report["metric"]
        if m["trained_quantized"] is not None and m["merged"] < m["trained_quantized"] - 0.02:
            problems.append(f"merged {m['name']} {m['merged']:.3f} is more than 2 points below the trained QLoRA model's {m['trained_quantized']:.3f}")
        del qmodel
    report["problems"] = problems
    report["status"] = "ok" if not problems else ("forced" if force else "failed")
    if problems and not force:
        raise MergeCheckFailed(f"merge: verification failed ({'; '.join(problems)}); nothing written. See the numbers with --force --output elsewhere")
    _save_atomically(merged, tok, [run], out, report, overwrite)
    return report


def _save_atomically(model, tok, runs: list[Path], out: Path, report: dict, overwrite: bool) -> None:
    with output_dir(out, REPORT_FILE, sources=runs, overwrite=overwrite, what="merge: --output") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        gc = getattr(model, "generation_config", None)
        if gc is not None and getattr(model, "can_generate", lambda: False)():
            gc.save_pretrained(tmp)
        shutil.copy2(runs[0] / RECIPE_FILE, tmp / RECIPE_FILE)  # provenance: the recipe that trained it
        write_json(tmp / REPORT_FILE, report)


COMBINATIONS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def merge_many(run_dirs: list[str], output: str, combination: str = "linear", weights: Optional[list[float]] = None,
               density: float = 0.5, dtype: str = "float32", force: bool = False, inputs: Optional[list[str]] = None,
               overwrite: bool = False, trust: Trust = NONE) -> dict:
    """Combine several adapters trained on the same base (peft add_weighted_adapter), then merge and verify.

    Only generating tasks: classification runs each carry their own trained head, which no weighting can combine.
    """

    if combination not in COMBINATIONS:
        raise LoraFtError(f"merge: --combination {combination} is not one of {', '.join(COMBINATIONS)}")
    _check_dtype(dtype)
    runs = [require_run_dir(r) for r in run_dirs]
    check_output(Path(output), REPORT_FILE, sources=runs, overwrite=overwrite, what="merge: --output")
    recipes = [granted(load_run_recipe(r), trust, r) for r in runs]
    a = recipes[0].args
    if any(r.args.model_name_or_path != a.model_name_or_path or r.args.task != a.task for r in recipes):
        raise LoraFtError("merge: the runs differ in base model or task; only adapters of one base combine")
    from .tasks import get_task

    if not get_task(a.task).COMBINABLE:
        raise LoraFtError(f"merge: several {a.task} adapters cannot be combined (each has its own head); merge them one by one")
    weights = weights or [1.0 / len(runs)] * len(runs)
    if len(weights) != len(runs):
        raise LoraFtError(f"merge: {len(weights)} --weights for {len(runs)} runs; give one weight per run")
    texts, _ = verification_inputs(runs[0], a.task, inputs)
    model, tok = _load(runs[0], recipes[0], dtype, quantized=False)
    names = ["default"]
    for i, r in enumerate(runs[1:], start=1):
        model.load_adapter(str(r), adapter_name=f"run{i}")
        names.append(f"run{i}")
    kw = {"density": density} if combination.startswith(("ties", "dare", "magnitude")) else {}
    try:
        model.add_weighted_adapter(names, weights, "combined", combination_type=combination, **kw)
    except ValueError as e:  # e.g. linear needs equal ranks
        raise LoraFtError(f"merge: peft cannot combine these adapters with {combination} ({str(e).splitlines()[0]}); try cat or svd") from None
    model.set_adapter("combined")
    model.eval()  # modules created after the first eval() start in training mode: their dropout would be live
    ref = _logits(model, tok, texts, a)
    for n in names:
        model.delete_adapter(n)
    merged = model.merge_and_unload()
    new = _logits(merged, tok, texts, a)
    check = _compare(ref, new)
    atol, rtol, floor = TOLERANCE[dtype]
    tol = atol + rtol * check["logit_scale"]
    problems = [p for p in (f"max |logit diff| {check['max_abs_logit_diff']:.3g} > {tol:.3g}" if check["max_abs_logit_diff"] > tol else "",
                            f"argmax agreement {check['argmax_agreement']:.3f} < {floor}" if check["argmax_agreement"] < floor else "") if p]
    report = {"run_dirs": [str(r) for r in runs], "combination": combination, "weights": weights, "density": kw.get("density"),
              "output": str(Path(output)), "dtype": dtype, "task": a.task, "n_inputs": len(texts), "base_model": a.model_name_or_path,
              "combined_adapter_vs_merged": check, "adapter_vs_merged": check,
              "tolerance": {"max_abs_logit_diff": tol, "argmax_agreement": floor}, "metric": {"name": None},
              "problems": problems, "status": "ok" if not problems else ("forced" if force else "failed")}
    if problems and not force:
        raise MergeCheckFailed(f"merge: verification failed ({'; '.join(problems)}); nothing written")
    _save_atomically(merged, tok, runs, Path(output), report, overwrite)
    return report
