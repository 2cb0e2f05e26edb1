"""`lora-ft search` (optuna, 3 trials, resumable) and `lora-ft compare` (HTML + Markdown, checked in headless Chromium)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from conftest import cls_recipe
from lora_ft.cli import main
from lora_ft.config import load_recipe

SPACE = "learning_rate=loguniform(1e-3,3e-2) lora_r=choice(2,4,8)"


@pytest.fixture(scope="module")
def search_dir(tmp_path_factory, tiny_gpt2, tiny_data):
    root = tmp_path_factory.mktemp("search")
    recipe = cls_recipe(root / "r.yaml", tiny_gpt2, tiny_data, max_steps=4, eval_strategy="steps", eval_steps=2,
                        output_dir=str(root / "search"))
    assert main(["search", str(recipe), "--n-trials", "3", "--space", SPACE]) == 0
    return root


def test_search_runs_trials_and_writes_the_best_recipe(search_dir):
    parent = search_dir / "search"
    summary = json.loads((parent / "search_summary.json").read_text())
    assert len(summary["trials"]) == 3 and summary["metric"] == "eval_accuracy" and summary["direction"] == "maximize"
    states = [t["state"] for t in summary["trials"]]
    assert states.count("COMPLETE") >= 2 and set(states) <= {"COMPLETE", "PRUNED"}
    for t in summary["trials"]:
        assert 1e-3 <= t["params"]["learning_rate"] <= 3e-2 and t["params"]["lora_r"] in (2, 4, 8)
        if t["state"] == "COMPLETE":  # each trial is a normal run dir
            m = json.loads((parent / f"trial-{t['number']:03d}" / "metrics.json").read_text())
            assert m["eval_accuracy"] == t["value"]
    complete = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
    assert summary["best_value"] == max(t["value"] for t in complete)
    best = load_recipe(str(parent / "best_recipe.yaml"))
    assert best.args.lora_r == summary["best_params"]["lora_r"]
    assert best.trainer["learning_rate"] == pytest.approx(summary["best_params"]["learning_rate"])


def test_search_resumes_from_its_storage(search_dir, capsys):
    parent = search_dir / "search"
    before = {p.name: p.stat().st_mtime for p in parent.glob("trial-*")}
    capsys.readouterr()
    assert main(["search", str(search_dir / "r.yaml"), "--n-trials", "4", "--space", SPACE]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "3 trial(s) already finished" in out
    after = {p.name: p.stat().st_mtime for p in parent.glob("trial-*")}
    assert set(after) - set(before) == {"trial-003"}
    assert all(after[n] == before[n] for n in before)  # finished trials are not re-run
    assert len(json.loads((parent / "search_summary.json").read_text())["trials"]) == 4


@pytest.mark.parametrize("space, culprit", [("lr=normal(1,2)", "--space"), ("lora_r=choice()", "choice"),
                                             ("learning_rate=loguniform(0,1)", "lo > 0"), ("lerning_rate=uniform(0,1)", "lerning_rate")])
def test_bad_search_space(tmp_path, tiny_gpt2, tiny_data, capsys, space, culprit):
    recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, tiny_data, output_dir=str(tmp_path / "s"))
    assert main(["search", str(recipe), "--n-trials", "1", "--space", space]) == 2
    assert culprit in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_compare_html_and_markdown(search_dir, gpt2_run, tmp_path, capsys):
    report = tmp_path / "report.html"
    capsys.readouterr()
    assert main(["compare", str(search_dir / "search"), str(gpt2_run.run_dir), "--output", str(report), "--markdown"]) == 0
    md = capsys.readouterr().out
    assert "## Recipe differences" in md and "| learning_rate |" in md and "| eval_accuracy |" in md and "**" in md
    page = report.read_text()
    assert page.count("data:image/png;base64,") >= 2  # loss curves + metric vs a hyperparameter
    assert "loss_curves.png" in page and "eval_accuracy_vs_learning_rate.png" in page
    assert "class='diff'" in page and "trial-000" in page
    # its own reports are replaced on a re-run (HTML and Markdown alike)
    assert main(["compare", str(gpt2_run.run_dir), "--output", str(report)]) == 0
    assert main(["compare", str(gpt2_run.run_dir), "--output", str(tmp_path / "r.md")]) == 0
    assert main(["compare", str(gpt2_run.run_dir), "--output", str(tmp_path / "r.md")]) == 0
    assert "## Recipe differences" in (tmp_path / "r.md").read_text() or "|" in (tmp_path / "r.md").read_text()
    assert main(["compare", str(tmp_path / "nope")]) == 2


def test_report_renders_in_headless_chromium(search_dir, tmp_path):
    """The HTML a user opens shows its plots: screenshot it and check the image is not blank."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (apt-get install chromium); .ci/run installs it")
    report, shot = tmp_path / "report.html", tmp_path / "shot.png"
    assert main(["compare", str(search_dir / "search"), "--output", str(report)]) == 0
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1400,2000",
                    report.as_uri()], capture_output=True, timeout=120)
    assert shot.is_file()
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 200  # plot lines, markers, anti-aliased text: far from a blank page
    # matplotlib's default blue (#1f77b4) from the plots is on screen
    assert any(abs(r - 31) < 12 and abs(g - 119) < 12 and abs(b - 180) < 12 for _, (r, g, b) in colors)
