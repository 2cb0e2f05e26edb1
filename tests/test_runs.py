"""The run directory: refusing to overwrite another run, and recognising a finished one."""

from __future__ import annotations

import pytest

from lora_ft.config import RECIPE_FILE, resolve, save_recipe
from lora_ft.errors import RunDirError
from lora_ft.runs import check_output_dir, read_metrics, require_run_dir, write_json


def recipe(**keys):
    return resolve({"model_name_or_path": "m", "dataset_name": "d", **keys})


def test_new_or_empty_dir_is_fine(tmp_path):
    check_output_dir(tmp_path / "new", recipe())
    check_output_dir(tmp_path, recipe())
    (tmp_path / ".hidden").write_text("x")
    check_output_dir(tmp_path, recipe())


def test_same_run_may_be_rerun(tmp_path):
    save_recipe(recipe(lora_r=4), tmp_path)
    check_output_dir(tmp_path, recipe(lora_r=8, learning_rate=1e-3))  # hyperparameters may change


@pytest.mark.parametrize("key, value", [("model_name_or_path", "other"), ("dataset_name", "other")])
def test_different_run_is_refused(tmp_path, key, value):
    save_recipe(recipe(), tmp_path)
    with pytest.raises(RunDirError, match="different run") as exc:
        check_output_dir(tmp_path, recipe(**{key: value}))
    assert key in str(exc.value) and "other" in str(exc.value)


def test_interrupted_run_checkpoints_only(tmp_path):
    (tmp_path / "checkpoint-10").mkdir()
    check_output_dir(tmp_path, recipe())


def test_foreign_folder_and_file_are_refused(tmp_path):
    (tmp_path / "thesis.tex").write_text("x")
    with pytest.raises(RunDirError, match="not a lora_ft run"):
        check_output_dir(tmp_path, recipe())
    with pytest.raises(RunDirError, match="is a file"):
        check_output_dir(tmp_path / "thesis.tex", recipe())


def test_require_run_dir(tmp_path):
    with pytest.raises(RunDirError, match="no such run dir"):
        require_run_dir(tmp_path / "missing")
    with pytest.raises(RunDirError, match=RECIPE_FILE):
        require_run_dir(tmp_path)
    save_recipe(recipe(), tmp_path)
    with pytest.raises(RunDirError, match="did not finish"):
        require_run_dir(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    assert require_run_dir(tmp_path) == tmp_path


def test_write_json_leaves_no_temp_file(tmp_path):
    import numpy as np

    write_json(tmp_path / "metrics.json", {"a": np.float32(0.5), "b": [1, 2]})
    assert read_metrics(tmp_path) == {"a": 0.5, "b": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert read_metrics(tmp_path / "nothing") == {}
