"""Compression of a merged model with a measured before/after table: size, latency, task metric.

Methods:
  int8          dynamic int8 Linear layers for CPU inference (a runtime transform; see `int8_dynamic`)
  nf4           bitsandbytes 4-bit NF4, saved as a serialized 4-bit folder (reloads with from_pretrained)
  prune:S       unstructured L1 magnitude pruning of a fraction S of every adapted Linear weight, made permanent
  prune:S:structured   L2 structured pruning of whole output rows, made permanent
Heads and embeddings are never compressed: they are small and the task depends on them.
"""

from __future__ import annotations

import io
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from .errors import LoraFtError
from .modeling import HEAD_NAMES
from .outputs import check_output, output_dir
from .runs import write_json
from .trust import NONE, Trust

REPORT = "compress_report"


def parse_method(method: str) -> tuple[str, float, bool]:
    parts = method.split(":")
    if parts[0] in ("int8", "nf4") and len(parts) == 1:
        return parts[0], 0.0, False
    if parts[0] == "prune" and len(parts) in (2, 3):
        try:
            amount = float(parts[1])
        except ValueError:
            amount = -1.0
        if not 0.0 < amount < 1.0 or (len(parts) == 3 and parts[2] != "structured"):
            raise LoraFtError(f"--method {method}: use prune:S or prune:S:structured with 0 < S < 1, e.g. prune:0.3")
        return "prune", amount, len(parts) == 3
    raise LoraFtError(f"--method {method}: use int8, nf4, prune:S or prune:S:structured")


def _compressible(model):
    """(name, Linear) pairs outside heads and embeddings."""
    import torch

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not any(part in HEAD_NAMES or part == "lm_head" for part in name.split(".")):
            yield name, mod


def prune_model(model, amount: float, structured: bool) -> float:
    """Prune in place and make it permanent; returns the resulting sparsity of the pruned weights."""
    import torch.nn.utils.prune as prune

    zeros = total = 0
    for _, mod in _compressible(model):
        if structured:
            prune.ln_structured(mod, "weight", amount=amount, n=2, dim=0)
        else:
            prune.l1_unstructured(mod, "weight", amount=amount)
        prune.remove(mod, "weight")  # bake the mask into the weight: no reparametrisation left behind
        zeros += int((mod.weight == 0).sum())
        total += mod.weight.numel()
    return zeros / max(total, 1)


def int8_dynamic(model):
    import torch

    names = {n for n, _ in _compressible(model)}
    spec = {n: torch.ao.quantization.default_dynamic_qconfig for n in names}
    return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)


def _weights_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20


def _state_dict_mb(model) -> float:
    """Serialized size of a model whose layers safetensors cannot hold (dynamic int8): measured in memory."""
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes / 2**20


def _measure(model, tok, recipe, split: Optional[str]) -> dict:
    from .tasks import get_task

    task = get_task(recipe.args.task)
    warm = replace(recipe, args=replace(recipe.args, max_eval_samples=4))
    task.evaluate_run(model, tok, warm, split)  # first calls pay one-off costs (allocations, kernel selection)
    t0 = time.perf_counter()
    m = get_task(recipe.args.task).evaluate_run(model, tok, recipe, split)
    dt = time.perf_counter() - t0
    key = task.COMPRESS_METRIC
    return {"metric_name": key, "metric": m[key], "latency_ms_per_example": 1000 * dt / max(m.get("eval_samples", 1), 1),
            "eval_samples": m.get("eval_samples")}


def compress(model_dir: str, method: str, eval_dataset: str, output: Optional[str] = None, split: Optional[str] = None,
             max_samples: Optional[int] = 500, overwrite: bool = False, trust: Trust = NONE) -> dict:
    from .inference import load_run

    kind, amount, structured = parse_method(method)
    src = Path(model_dir)
    if not (src / "config.json").is_file():
        raise LoraFtError(f"compress: {model_dir} is not a merged model folder (no config.json); run `lora-ft merge` first")
    out = Path(output) if output else src.parent / f"{src.name}-{method.replace(':', '-')}"
    mark, what = f"{REPORT}.json", "compress: --output"
    check_output(out, mark, sources=[src], overwrite=overwrite, what=what)
    model, tok, recipe = load_run(src, trust)
    data_keys = {"dataset_name": eval_dataset, "max_eval_samples": max_samples}
    recipe = replace(recipe, args=replace(recipe.args, **data_keys))
    before = _measure(model, tok, recipe, split)
    before["size_mb"] = round(_weights_mb(src), 2)
    extra = {}
    with output_dir(out, mark, sources=[src], overwrite=overwrite, what=what) as tmp:
        if kind == "prune":
            extra["sparsity"] = prune_model(model, amount, structured)
            model.save_pretrained(tmp, safe_serialization=True)
            after_model = model
            size = _weights_mb(tmp)
            extra["note"] = "dense safetensors: zeros are stored; the size gain needs a sparse format or structured removal"
        elif kind == "int8":
            after_model = int8_dynamic(model)
            size = _state_dict_mb(after_model)
            extra["note"] = "dynamic int8 is applied at load time (lora_ft.compress.int8_dynamic); size is the in-memory serialized state"
        else:
            after_model, size = _nf4(src, recipe, tmp)
        tok.save_pretrained(tmp)
        for name in ("lora_ft_recipe.yaml", "generation_config.json"):
            if (src / name).is_file() and not (tmp / name).exists():
                shutil.copy2(src / name, tmp / name)
        after = _measure(after_model, tok, recipe, split)
        after["size_mb"] = round(size, 2)
        report = {"model": str(src), "method": method, "eval_dataset": eval_dataset, "split": split,
                  "original": before, "compressed": after, **extra,
                  "metric_delta": after["metric"] - before["metric"], "size_ratio": after["size_mb"] / max(before["size_mb"], 1e-9)}
        write_json(tmp / f"{REPORT}.json", report)
        (tmp / f"{REPORT}.md").write_text(markdown_table(report), encoding="utf-8")
    report["output"] = str(out)
    return report


def _nf4(src: Path, recipe, tmp: Path):
    from .modeling import load_model
    from .tasks import auto_class, get_task

    task = get_task(recipe.args.task)
    a = replace(recipe.args, model_name_or_path=str(src), load_in_4bit=True, load_in_8bit=False)
    model, _ = load_model(a, auto_class(task), training=False)
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    return model, _weights_mb(tmp)


def markdown_table(r: dict) -> str:
    o, c = r["original"], r["compressed"]
    lines = [f"| {r['method']} on {Path(r['model']).name} | size (MB) | latency (ms/example) | {o['metric_name']} |",
             "|---|---|---|---|",
             f"| original | {o['size_mb']:.1f} | {o['latency_ms_per_example']:.1f} | {o['metric']:.4f} |",
             f"| compressed | {c['size_mb']:.1f} | {c['latency_ms_per_example']:.1f} | {c['metric']:.4f} |"]
    if "sparsity" in r:
        lines.append(f"\nsparsity of compressed Linear weights: {r['sparsity']:.3f}")
    if "note" in r:
        lines.append(f"\nnote: {r['note']}")
    return "\n".join(lines) + "\n"
