"""PNG plots a user looks at: loss curves and confusion matrices. Headless (Agg) always."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve(log_history: list[dict], key: str) -> list[tuple]:
    """(step, value) of `key` in the periodic logs. The trainer's end-of-training summary (train_runtime, ...) is left
    out: trl folds the metrics of the steps since the last log into it, often one short last batch (3 pairs after
    the 240 logged steps of benchmarks/dpo_hh.py's dpo row, accuracy 0.33), which would end each curve in a spike."""
    return [(h["step"], h[key]) for h in log_history if key in h and "step" in h and "train_runtime" not in h]


def plot_loss_curve(log_history: list[dict], path: Path) -> bool:
    train, evals = curve(log_history, "loss"), curve(log_history, "eval_loss")
    if not train and not evals:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_preference_curves(log_history: list[dict], path: Path) -> bool:
    """Loss, implicit-reward accuracy and margin over steps, train and eval, as trl's preference trainers log them."""
    panels = [("loss", "loss", "eval_loss"), ("reward accuracy", "rewards/accuracies", "eval_rewards/accuracies"),
              ("reward margin", "rewards/margins", "eval_rewards/margins")]
    series = [[curve(log_history, k) for k in keys] for _, *keys in panels]
    if not any(s for pair in series for s in pair):
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (title, *_), (train, evals) in zip(axes, panels, series):
        if train:
            ax.plot(*zip(*train), label="train")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if train or evals:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_confusion_matrix(cm: dict, path: Path) -> None:
    plt = _plt()
    labels, matrix = cm["labels"], cm["matrix"]
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.2 * n + 2))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(r) for r in matrix) if matrix else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center", color="white" if matrix[i][j] > top / 2 else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
