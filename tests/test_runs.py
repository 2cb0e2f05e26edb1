"""The run directory: refusing to overwrite another run, and recognising a finished one."""

from __future__ import annotations

import pytest

from lora_ft.config import RECIPE_FILE, resolve, save_recipe
from lora_ft.errors import RunDirError
from lora_ft.runs import STAGE, check_output_dir, read_metrics, replace_final_files, require_run_dir, write_json


def recipe(**keys):
    return resolve({"model_name_or_path": "m", "dataset_name": "d", **keys})


def test_new_or_empty_dir_is_fine(tmp_path):
    check_output_dir(tmp_path / "new", recipe())
    check_output_dir(tmp_path, recipe())
    (tmp_path / ".hidden").write_text("x")
    check_output_dir(tmp_path, recipe())


def test_same_run_may_be_rerun(tmp_path):
    save_recipe(recipe(lora_r=4), tmp_path)
    check_output_dir(tmp_path, recipe(lora_r=4))  # resumes or replaces it, as before
    # keys that change no output: logging, reporting, checkpoint cadence
    check_output_dir(tmp_path, recipe(lora_r=4, logging_steps=7, report_to="none", save_total_limit=2))
    # values training derived from the data and saved, which the re-run leaves to it again
    save_recipe(recipe(lora_r=4, labels=["b", "a"], use_chat_template=True), tmp_path)
    check_output_dir(tmp_path, recipe(lora_r=4))


@pytest.mark.parametrize("key, value", [("model_name_or_path", "other"), ("dataset_name", "other"),
                                        ("learning_rate", 1e-3), ("lora_r", 8), ("use_peft", False)])
def test_different_run_is_refused(tmp_path, key, value):
    """Any output-affecting key: a second run into the same folder would otherwise overwrite the first, and a
    use_peft: false run would leave the old adapter next to its own weights."""
    save_recipe(recipe(), tmp_path)
    with pytest.raises(RunDirError, match="different run") as exc:
        check_output_dir(tmp_path, recipe(**{key: value}))
    assert key in str(exc.value) and "--overwrite" in str(exc.value)
    check_output_dir(tmp_path, recipe(**{key: value}), overwrite=True)


def _final(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)


def test_final_files_are_replaced_as_a_set(tmp_path):
    """The old adapter, old eval rows and every other final file go; checkpoints stay; nothing is left aside."""
    run = tmp_path / "run"
    _final(run, adapter_config__json="{}", adapter_model__safetensors="old", eval_generations__jsonl="old rows",
           lora_ft_recipe__yaml="old", metrics__json="{}")
    (run / "checkpoint-4").mkdir()
    _final(run / STAGE, config__json="{}", model__safetensors="new", lora_ft_recipe__yaml="new", metrics__json="{}")
    replace_final_files(run, run / STAGE)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-4", "config.json", RECIPE_FILE, "metrics.json", "model.safetensors"]
    assert (run / RECIPE_FILE).read_text() == "new"


@pytest.mark.parametrize("crash_at", range(1, 10))
def test_a_crash_mid_move_leaves_nothing_that_loads_a_mix(tmp_path, monkeypatch, crash_at):
    """Wherever the move stops, the folder loads as the old run, the new run, or not at all (and then says why);
    and `lora-ft train` still recognises it as this recipe's run."""
    import os

    import lora_ft.runs

    run = tmp_path / "run"
    (run / STAGE).mkdir(parents=True)
    save_recipe(recipe(), run)
    _final(run, adapter_config__json="{}", adapter_model__safetensors="old", metrics__json="{}")
    stage = run / STAGE
    save_recipe(recipe(), stage)
    _final(stage, config__json="{}", model__safetensors="new", metrics__json="{}")
    calls = {"n": 0}
    real = os.replace

    def flaky(a, b):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(lora_ft.runs.os, "replace", flaky)
    try:
        replace_final_files(run, stage)
    except OSError:
        pass
    monkeypatch.setattr(lora_ft.runs.os, "replace", real)
    names = {p.name for p in run.iterdir()}
    try:
        require_run_dir(run)
    except RunDirError as e:
        assert "cut short" in str(e) or RECIPE_FILE in str(e)
    else:  # it loads: then wholly the old run or wholly the new one
        assert names & {"adapter_config.json", "config.json"} in ({"adapter_config.json"}, {"config.json"}), names
    check_output_dir(run, recipe())


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


# ---------------------------------------------------------------- end to end on a tiny model


def test_overwrite_with_a_full_finetune_leaves_no_old_adapter(tmp_path, tiny_gpt2, tiny_data, capsys):
    """LoRA, then the same recipe with use_peft: false: refused without --overwrite; with it, the old adapter goes
    (every loader prefers an adapter, so one left behind would be used next to the new metrics)."""
    from conftest import cls_recipe, train_in_process
    from lora_ft.cli import main

    recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, tiny_data, max_steps=2)
    run = train_in_process(recipe, tmp_path / "run")
    assert (run / "adapter_config.json").is_file()
    capsys.readouterr()
    assert main(["train", str(recipe), "--output_dir", str(run), "--use_peft", "false"]) == 2
    assert "use_peft" in capsys.readouterr().err and (run / "adapter_config.json").is_file()
    train_in_process(recipe, run, "--use_peft", "false", "--overwrite")
    assert not list(run.glob("adapter_*")) and (run / "model.safetensors").is_file()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_checkpoint_is_never_deleted_before_its_replacement_is_in(tmp_path, tiny_gpt2, tiny_data, monkeypatch, capsys):
    """A re-run saving checkpoint-2 again, whose rename into place fails: the old checkpoint-2 is still there."""
    import os

    import lora_ft.trainers
    from conftest import cls_recipe, train_in_process
    from lora_ft.cli import main

    recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, tiny_data, max_steps=2, save_strategy="steps", save_steps=2)
    run = train_in_process(recipe, tmp_path / "run")
    before = sorted(p.name for p in (run / "checkpoint-2").iterdir())
    real = os.replace

    def fail_into_place(a, b):
        if os.path.basename(b) == "checkpoint-2" and os.path.basename(a) == "checkpoint-2":  # staged -> final
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(lora_ft.trainers.os, "replace", fail_into_place)
    capsys.readouterr()
    assert main(["train", str(recipe), "--output_dir", str(run)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoint-2").iterdir()) == before


def test_a_checkpoint_left_aside_by_a_kill_is_put_back(tmp_path):
    from lora_ft.trainers import ASIDE, CHECKPOINT_STAGE, restore_checkpoints

    aside = tmp_path / CHECKPOINT_STAGE / f"checkpoint-4{ASIDE}"
    aside.mkdir(parents=True)
    (aside / "trainer_state.json").write_text("{}")
    restore_checkpoints(tmp_path)
    assert (tmp_path / "checkpoint-4" / "trainer_state.json").is_file()


def test_a_run_saved_before_a_key_existed_is_the_same_run(tmp_path):
    """A run dir written by an older lora_ft lacks the keys added since (token classification's, say): re-running
    its recipe is the same run, not a 'different' one that lacks them."""
    import yaml

    save_recipe(recipe(lora_r=4), tmp_path)
    path = tmp_path / RECIPE_FILE
    saved = yaml.safe_load(path.read_text())
    for key in ("tag_scheme", "label_all_tokens", "tokens_column", "tags_column", "head_init"):
        saved.pop(key, None)
    path.write_text(yaml.safe_dump(saved))
    check_output_dir(tmp_path, recipe(lora_r=4))
    with pytest.raises(RunDirError, match="lora_r"):
        check_output_dir(tmp_path, recipe(lora_r=8))
