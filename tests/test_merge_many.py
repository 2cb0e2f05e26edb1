"""Combining several adapters of one base (peft add_weighted_adapter), merged and verified."""

from __future__ import annotations

import json

import pytest

from fixtures_gen import llama_models, write_jsonl  # noqa: F401
from lora_ft.cli import main

ROWS = [{"prompt": f"what is {i} plus {i}", "completion": f"it is {2 * i}"} for i in range(24)]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, llama_models):
    root = tmp_path_factory.mktemp("many")
    data = write_jsonl(root / "data.jsonl", ROWS)
    runs = []
    for seed in (1, 2):
        run = root / f"r{seed}"
        argv = ["train", "--model_name_or_path", llama_models[1], "--task", "causal-lm", "--dataset_name", data, "--seed", seed,
                "--max_steps", 3, "--max_length", 64, "--learning_rate", "1e-2", "--report_to", "none", "--save_strategy", "no", "--output_dir", run]
        assert main([str(x) for x in argv]) == 0
        runs.append(run)
    return root, runs


@pytest.mark.parametrize("combination", ["linear", "ties", "dare_linear", "cat"])
def test_combined_adapters_merge_within_tolerance(two_runs, combination, capsys):
    root, (r1, r2) = two_runs
    out = root / f"merged-{combination}"
    assert main(["merge", str(r1), str(r2), "--output", str(out), "--combination", combination, "--weights", "0.6,0.4"]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["status"] == "ok" and report["combination"] == combination and report["weights"] == [0.6, 0.4]
    assert report["adapter_vs_merged"]["max_abs_logit_diff"] <= report["tolerance"]["max_abs_logit_diff"]
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()


def test_combination_changes_the_model(two_runs):
    """The combined model differs from either adapter alone: the weights really were mixed."""
    from safetensors.torch import load_file

    root, (r1, r2) = two_runs
    assert main(["merge", str(r1), "--output", str(root / "only1")]) == 0
    assert main(["merge", str(r1), str(r2), "--output", str(root / "mix"), "--weights", "0.5,0.5"]) == 0
    a, b = load_file(root / "only1" / "model.safetensors"), load_file(root / "mix" / "model.safetensors")
    key = next(k for k in a if "q_proj" in k)
    assert (a[key] - b[key]).abs().max() > 1e-6


def test_bad_weights_and_classification_are_one_line_errors(two_runs, capsys):
    root, (r1, r2) = two_runs
    assert main(["merge", str(r1), str(r2), "--output", str(root / "x"), "--weights", "0.5"]) == 2
    assert main(["merge", str(r1), str(r2), "--output", str(root / "x"), "--combination", "bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("lora-ft: error: merge:") for line in err)
    assert not (root / "x").exists()
