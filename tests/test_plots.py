"""Curves read from a trainer's log history: periodic logs only, never the end-of-training summary."""

from lora_ft.plots import curve, plot_preference_curves

# The shape of trl's DPO log history: periodic logs, an eval, then the summary, into which trl folds the metrics of
# the steps since the last log (here one short batch: accuracy 0.33, a spike at the end of every curve).
HISTORY = [
    {"loss": 0.69, "rewards/accuracies": 0.55, "rewards/margins": 0.01, "step": 10},
    {"loss": 0.66, "rewards/accuracies": 0.62, "rewards/margins": 0.12, "step": 20},
    {"eval_loss": 0.67, "eval_rewards/accuracies": 0.60, "step": 20},
    {"train_runtime": 12.0, "train_loss": 0.67, "rewards/accuracies": 0.33, "rewards/margins": -0.07, "step": 21},
]


def test_curve_leaves_out_the_training_summary():
    assert curve(HISTORY, "rewards/accuracies") == [(10, 0.55), (20, 0.62)]
    assert curve(HISTORY, "eval_rewards/accuracies") == [(20, 0.60)]
    assert curve(HISTORY, "loss") == [(10, 0.69), (20, 0.66)]


def test_preference_curves_png(tmp_path):
    assert plot_preference_curves(HISTORY, tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size > 1000
    assert not plot_preference_curves([{"train_runtime": 1.0, "step": 1}], tmp_path / "none.png")
