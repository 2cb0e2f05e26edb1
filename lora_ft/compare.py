"""Side-by-side comparison of finished runs: recipe differences, metrics, speed and memory, loss curves and
metric-vs-hyperparameter plots, as one self-contained HTML file (PNG plots inlined) or Markdown."""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import RunDirError

METRIC_KEYS = ("eval_accuracy", "eval_macro_f1", "eval_f1", "eval_exact_match", "eval_rougeL", "eval_loss", "eval_perplexity",
               "train_loss", "train_runtime", "train_samples_per_second", "train_tokens_per_second", "peak_memory_mb", "world_size")
LOWER_IS_BETTER = ("loss", "perplexity", "runtime", "memory")
IGNORED_KEYS = ("output_dir", "logging_dir")
REPORT_MARK = "<!-- written by lora-ft compare -->"  # `compare --output` replaces only files that carry it


@dataclass
class Run:
    name: str
    path: Path
    recipe: dict
    metrics: dict
    history: list


def expand(paths: list[str]) -> list[Path]:
    """Run dirs as given; a `lora-ft search` folder stands for its finished trials."""
    out = []
    for p in map(Path, paths):
        if (p / "search_summary.json").is_file():
            out += sorted(d for d in p.glob("trial-*") if (d / "metrics.json").is_file())
        else:
            out.append(p)
    return out


def load_runs(paths: list[str]) -> list[Run]:
    from .config import RECIPE_FILE, read_recipe_file

    runs, names = [], set()
    for p in expand(paths):
        if not (p / "metrics.json").is_file() or not (p / RECIPE_FILE).is_file():
            raise RunDirError(f"{p}: not a finished run (no metrics.json or {RECIPE_FILE}); pass run dirs written by `lora-ft train`")
        name = p.name if p.name not in names else f"{p.parent.name}/{p.name}"
        names.add(name)
        hist = json.loads((p / "log_history.json").read_text()) if (p / "log_history.json").is_file() else []
        runs.append(Run(name, p, read_recipe_file(p / RECIPE_FILE), json.loads((p / "metrics.json").read_text()), hist))
    if len(runs) < 1:
        raise RunDirError("compare: no runs given")
    return runs


def differing_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.recipe} - set(IGNORED_KEYS))
    return [k for k in keys if len({json.dumps(r.recipe.get(k), sort_keys=True, default=str) for r in runs}) > 1]


def metric_keys(runs: list[Run]) -> list[str]:
    return [k for k in METRIC_KEYS if any(isinstance(r.metrics.get(k), (int, float)) for r in runs)]


def primary_metric(runs: list[Run]) -> str | None:
    for k in ("eval_accuracy", "eval_f1", "eval_loss"):
        if any(isinstance(r.metrics.get(k), (int, float)) for r in runs):
            return k
    return None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "-" if v is None else str(v)


def _best(runs: list[Run], key: str):
    vals = [r.metrics.get(key) for r in runs if isinstance(r.metrics.get(key), (int, float))]
    if len(vals) < 2 or len(set(vals)) == 1:  # nothing to single out
        return None
    return min(vals) if any(w in key for w in LOWER_IS_BETTER) else max(vals)


def plot_pngs(runs: list[Run], diff: list[str]) -> dict[str, bytes]:
    from .plots import _plt, curve

    plt = _plt()
    pngs = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for r in runs:
        pts, ev = curve(r.history, "loss"), curve(r.history, "eval_loss")
        if pts:
            line, = ax.plot(*zip(*pts), label=f"{r.name} train")
            drawn = True
            if ev:
                ax.plot(*zip(*ev), "o--", color=line.get_color(), label=f"{r.name} eval")
    if drawn:
        ax.set(xlabel="step", ylabel="loss", title="Loss curves")
        ax.legend(fontsize=7)
        pngs["loss_curves.png"] = _png(fig)
    plt.close(fig)
    metric = primary_metric(runs)
    for key in diff:
        xs = [(r.recipe.get(key), r.metrics.get(metric)) for r in runs]
        xs = [(x, y) for x, y in xs if isinstance(x, (int, float)) and not isinstance(x, bool) and isinstance(y, (int, float))]
        if metric is None or len(xs) < 2:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ax.scatter(*zip(*xs))
        if key == "learning_rate" or (min(x for x, _ in xs) > 0 and max(x for x, _ in xs) / min(x for x, _ in xs) > 20):
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=metric, title=f"{metric} vs {key}")
        pngs[f"{metric}_vs_{key}.png"] = _png(fig)
        plt.close(fig)
    return pngs


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def markdown(runs: list[Run]) -> str:
    diff = differing_keys(runs)
    names = [r.name for r in runs]
    lines = ["## Recipe differences", "", "| key | " + " | ".join(names) + " |", "|---|" + "---|" * len(runs)]
    lines += [f"| {k} | " + " | ".join(_fmt(r.recipe.get(k)) for r in runs) + " |" for k in diff] or ["| (none) |" + " |" * len(runs)]
    lines += ["", "## Metrics, speed, memory (best in bold)", "", "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(runs)]
    for k in metric_keys(runs):
        best = _best(runs, k)
        cells = [f"**{_fmt(r.metrics.get(k))}**" if best is not None and r.metrics.get(k) == best else _fmt(r.metrics.get(k)) for r in runs]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def html_report(runs: list[Run]) -> str:
    diff = differing_keys(runs)
    pngs = plot_pngs(runs, diff)
    esc = html.escape
    head = "".join(f"<th>{esc(r.name)}</th>" for r in runs)
    keys = sorted({k for r in runs for k in r.recipe} - set(IGNORED_KEYS), key=lambda k: (k not in diff, k))
    recipe_rows = "".join(
        f"<tr class='{'diff' if k in diff else 'same'}'><td>{esc(k)}</td>" + "".join(f"<td>{esc(_fmt(r.recipe.get(k)))}</td>" for r in runs) + "</tr>"
        for k in keys)
    metric_rows = ""
    for k in metric_keys(runs):
        best = _best(runs, k)
        metric_rows += f"<tr><td>{esc(k)}</td>" + "".join(
            f"<td class='{'best' if best is not None and r.metrics.get(k) == best else ''}'>{esc(_fmt(r.metrics.get(k)))}</td>" for r in runs) + "</tr>"
    imgs = "".join(f"<figure><img alt='{esc(n)}' src='data:image/png;base64,{base64.b64encode(b).decode()}'><figcaption>{esc(n)}</figcaption></figure>"
                   for n, b in pngs.items())
    paths = "".join(f"<li><code>{esc(r.name)}</code>: {esc(str(r.path))}</li>" for r in runs)
    return f"""<!doctype html>{REPORT_MARK}<html><head><meta charset="utf-8"><title>lora_ft run comparison</title><style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}} th{{background:#f3f3f3}} tr.diff td{{background:#fff3c4}}
tr.same td{{color:#888}} td.best{{font-weight:bold;background:#dff5df}} figure{{display:inline-block;margin:0 1em 1em 0}}
img{{max-width:100%;border:1px solid #ddd}} figcaption{{font-size:12px;color:#666}} details{{margin:1em 0}}</style></head><body>
<h1>lora_ft run comparison</h1><ul>{paths}</ul>
<h2>Metrics, speed, memory</h2><p>Best value per row highlighted (lower is better for loss, perplexity, runtime and memory).</p>
<table><tr><th>metric</th>{head}</tr>{metric_rows}</table>
<h2>Plots</h2><div id="plots">{imgs or "<p>No loss history in these runs.</p>"}</div>
<h2>Recipes</h2><p>{len(diff)} key(s) differ (highlighted, listed first).</p>
<table><tr><th>key</th>{head}</tr>{recipe_rows}</table></body></html>
"""
