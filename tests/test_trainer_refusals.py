"""Settings that transformers or trl refuse when the trainer is built end as one line and exit 2, nothing written."""

from __future__ import annotations

from fixtures_gen import llama_models, write_jsonl  # noqa: F401
from lora_ft.cli import main

ROWS = [{"prompt": f"what is {i} plus {i}", "completion": f"it is {2 * i}"} for i in range(8)]


def test_trl_refusal_is_one_line(tmp_path, llama_models, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    run = tmp_path / "run"
    argv = ["train", "--model_name_or_path", llama_models[1], "--task", "causal-lm", "--dataset_name", data, "--max_steps", 1,
            "--max_length", 64, "--padding_free", "true", "--report_to", "none", "--save_strategy", "no", "--output_dir", run]
    assert main([str(x) for x in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lora-ft: error: recipe: the trainer refused these settings:") and "padding_free" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not run.exists()
