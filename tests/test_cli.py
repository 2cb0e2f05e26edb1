"""The `lora-ft` command line: predict/eval on a trained run, light imports, and bad input turned into exit 2."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time

import pytest

from conftest import FAST, LABELS, LORA_FT, cls_recipe, json_lines, read_rows, run_cli, write_csv, write_jsonl, write_recipe
from lora_ft.cli import main

HEAVY = ("torch", "transformers", "datasets", "peft", "trl", "numpy", "sklearn", "matplotlib", "bitsandbytes")


# ---------------------------------------------------------------- startup


def test_cli_import_is_light():
    """`lora-ft --help` must answer at once: the entry module may not pull in the ML stack."""
    code = f"import sys, lora_ft.cli; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert ast.literal_eval(out.strip()) == []


def test_help_answers_quickly():
    started = time.monotonic()
    proc = subprocess.run([LORA_FT, "--help"], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0
    for cmd in ("train", "predict", "eval", "models"):
        assert cmd in proc.stdout
    assert elapsed < 5.0, f"lora-ft --help took {elapsed:.1f}s (the contract is < 1 s; 5 s allows for a loaded box)"


def test_train_help_keys(capsys):
    assert main(["train", "--help-keys"]) == 0
    out = capsys.readouterr().out
    for key in ("model_name_or_path", "lora_r", "load_in_4bit", "learning_rate", "per_device_train_batch_size"):
        assert key in out


# ---------------------------------------------------------------- predict


def test_predict_prints_json_lines_only(gpt2_run):
    texts = ["What a lovely, sunny afternoon!", "The meeting moved to room 12."]
    proc = run_cli("predict", gpt2_run.run_dir, "--text", texts[0], "--text", texts[1])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = json_lines(proc.stdout)  # raises on any non-JSON line: logs belong on stderr
    assert [r["text"] for r in rows] == texts
    for r in rows:
        assert set(r) == {"text", "label", "score", "scores"}
        assert r["label"] in LABELS and list(r["scores"]) == LABELS
        assert r["score"] == max(r["scores"].values())


def test_predict_input_file_to_output_file(gpt2_run, tiny_data, tmp_path, capsys):
    texts = [r["text"] for r in read_rows(tiny_data / "test.csv")][:5]
    assert main(["predict", str(gpt2_run.run_dir)] + sum((["--text", t] for t in texts), [])) == 0
    expected = json_lines(capsys.readouterr().out)

    txt = tmp_path / "in.txt"
    txt.write_text("\n".join(texts) + "\n\n", encoding="utf-8")  # blank lines are not texts
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(gpt2_run.run_dir), "--input", str(txt), "--output", str(out)]) == 0
    assert capsys.readouterr().out == ""  # everything went to the file
    assert json_lines(out.read_text(encoding="utf-8")) == expected

    csv_in = write_csv(tmp_path / "in.csv", [{"id": i, "sentence": t} for i, t in enumerate(texts)])
    out2 = tmp_path / "out2.jsonl"
    assert main(["predict", str(gpt2_run.run_dir), "--input", str(csv_in), "--text_column", "sentence", "--output", str(out2)]) == 0
    assert json_lines(out2.read_text(encoding="utf-8")) == expected


@pytest.mark.parametrize("args, culprit", [
    ([], "no input"),
    (["--input", "{tmp}/missing.txt"], "missing.txt"),
    (["--input", "{tmp}/in.csv", "--text_column", "body"], "body"),
    (["--text", "x", "--temperature", "0"], "--temperature"),
])
def test_predict_bad_input(gpt2_run, tmp_path, capsys, args, culprit):
    write_csv(tmp_path / "in.csv", [{"text": "a"}])
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["predict", str(gpt2_run.run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-ft: error:") and culprit in err


def test_predict_needs_a_run_dir(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nope"), "--text", "x"]) == 2
    assert "nope" in capsys.readouterr().err


# ---------------------------------------------------------------- eval


def test_eval_on_another_file(gpt2_run, tiny_data, tmp_path, capsys):
    """Same rows under other column names: the metrics equal the ones written at the end of training."""
    rows = read_rows(tiny_data / "test.csv")
    other = write_csv(tmp_path / "other.csv", [{"sentence": r["text"], "sentiment": r["label"]} for r in rows])
    capsys.readouterr()
    rc = main(["eval", str(gpt2_run.run_dir), "--dataset_name", str(other), "--text_column", "sentence", "--label_column", "sentiment"])
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON document
    trained = json.loads((gpt2_run.run_dir / "metrics.json").read_text())
    assert metrics["eval_samples"] == len(rows)
    assert metrics["eval_accuracy"] == pytest.approx(trained["eval_accuracy"])
    assert metrics["eval_macro_f1"] == pytest.approx(trained["eval_macro_f1"])
    assert metrics["eval_confusion_matrix"] == json.loads((gpt2_run.run_dir / "confusion_matrix.json").read_text())


def test_eval_defaults_to_the_recipe_eval_split(gpt2_run, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["eval", str(gpt2_run.run_dir), "--output", str(out), "--max_eval_samples", "10"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["split"] == "test" and printed["eval_samples"] == 10


def test_eval_refuses_model_keys(gpt2_run, capsys):
    assert main(["eval", str(gpt2_run.run_dir), "--lora_r", "4"]) == 2
    assert "--lora_r" in capsys.readouterr().err


def test_eval_label_outside_the_run_labels(gpt2_run, tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv", [{"text": "fine", "label": "positive"}, {"text": "meh", "label": "mixed"}])
    assert main(["eval", str(gpt2_run.run_dir), "--dataset_name", str(data)]) == 2
    assert "mixed" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input to train: exit 2, one line each, nothing written


def bad_case(name: str, tmp_path, good_recipe, tiny_data):
    """(argv after `train`, substrings the error must contain, output_dir) for one kind of bad input."""
    out = tmp_path / "out"
    recipe = good_recipe
    extra: list[str] = []
    if name == "malformed_yaml":
        recipe = tmp_path / "broken.yaml"
        recipe.write_text(good_recipe.read_text() + "labels: [a, b\nlora_r: 4\n", encoding="utf-8")
        culprits = ["broken.yaml", "YAML", "line"]
    elif name == "unknown_key":
        extra, culprits = ["--lerning_rate", "1e-3"], ["lerning_rate", "learning_rate"]
    elif name == "wrong_type":
        extra, culprits = ["--lora_r", "sixteen"], ["lora_r", "sixteen"]
    elif name == "two_problems":
        extra, culprits = ["--lora_r", "sixteen", "--num_train_epoch", "2"], ["lora_r", "num_train_epoch"]
    elif name == "missing_recipe":
        recipe, culprits = tmp_path / "nowhere.yaml", ["nowhere.yaml", "not found"]
    elif name == "missing_dataset":
        extra, culprits = ["--dataset_name", str(tmp_path / "no_such_data")], ["no_such_data", "does not exist"]
    elif name == "missing_column":
        extra, culprits = ["--text_column", "sentence"], ["text_column", "sentence", "columns: text, label"]
    elif name == "label_outside":
        extra, culprits = ["--labels", "negative,positive"], ["neutral", "labels"]
    elif name == "non_utf8":
        data = tmp_path / "latin1"
        data.mkdir()
        (data / "train.csv").write_bytes("text,label\nun caf\xe9 tr\xe8s bon,positive\nbof,negative\n".encode("latin-1"))
        extra, culprits = ["--dataset_name", str(data), "--eval_split", "none"], ["train.csv", "UTF-8"]
    elif name == "empty_dataset":
        data = tmp_path / "blank"
        data.mkdir()
        (data / "train.csv").write_text("text,label\n ,positive\n\t,negative\n", encoding="utf-8")
        extra, culprits = ["--dataset_name", str(data), "--eval_split", "none"], ["no rows left", "text_column"]
    elif name == "not_a_dataset":
        data = tmp_path / "notes.docx"
        data.write_bytes(b"PK\x03\x04 not a table")
        extra, culprits = ["--dataset_name", str(data)], ["notes.docx"]
    elif name == "number_label_names":  # data 0..4, names 1..5: never read as positions
        data = tmp_path / "ints"
        write_csv(data / "train.csv", [{"text": f"row {i}", "label": i % 5} for i in range(10)])
        extra, culprits = ["--dataset_name", str(data), "--eval_split", "none", "--labels", "1,2,3,4,5"], ["label", "0", "never as positions"]
    elif name in ("csv_bad_line", "jsonl_bad_line"):
        data = tmp_path / "broken"
        data.mkdir()
        if name == "csv_bad_line":
            (data / "train.csv").write_text("text,label\nok,positive\nbad,row,extra\n", encoding="utf-8")
            culprits = ["train.csv", "line 3"]
        else:
            (data / "train.jsonl").write_text('{"text": "ok", "label": "positive"}\n{"text": "bad",\n', encoding="utf-8")
            culprits = ["train.jsonl", "line 2"]
        extra = ["--dataset_name", str(data), "--eval_split", "none"]
    elif name == "chat_template_error":
        import yaml

        data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "q", "completion": "a"}])
        model = yaml.safe_load(good_recipe.read_text())["model_name_or_path"]
        recipe = write_recipe(tmp_path / "chat.yaml", **{**FAST, "model_name_or_path": model, "task": "causal-lm",
                              "dataset_name": str(data), "eval_split": "none", "use_chat_template": True,
                              "chat_template": "{{ raise_exception('broken template') }}"})
        culprits = ["chat_template", "broken template"]
    elif name == "different_run":
        out.mkdir()
        write_recipe(out / "lora_ft_recipe.yaml", model_name_or_path="someone/else", dataset_name="other",
                     task="sequence-classification")
        (out / "keep.txt").write_text("precious")
        culprits = [str(out), "different run"]
    elif name == "not_a_run":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        culprits = [str(out), "not a lora_ft run"]
    else:
        raise AssertionError(name)
    return [str(recipe), "--output_dir", str(out), *extra], culprits, out


BAD = ["malformed_yaml", "unknown_key", "wrong_type", "two_problems", "missing_recipe", "missing_dataset",
       "missing_column", "label_outside", "non_utf8", "empty_dataset", "not_a_dataset", "different_run", "not_a_run",
       "number_label_names", "csv_bad_line", "jsonl_bad_line", "chat_template_error"]


@pytest.fixture()
def good_recipe(tmp_path, tiny_gpt2, tiny_data):
    return cls_recipe(tmp_path / "good.yaml", tiny_gpt2, tiny_data)


def check_failure(rc: int, err: str, culprits: list[str], out, before):
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("lora-ft: error: ") for ln in lines), err
    assert "Traceback" not in err
    for c in culprits:
        assert c in err, f"{c!r} not named in: {err}"
    after = sorted(p.name for p in out.iterdir()) if out.exists() else None
    assert after == before, "output_dir was created or changed"


@pytest.mark.parametrize("name", BAD)
def test_bad_train_input(name, tmp_path, good_recipe, tiny_data, capsys):
    argv, culprits, out = bad_case(name, tmp_path, good_recipe, tiny_data)
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    capsys.readouterr()
    rc = main(["train", *argv])
    err = capsys.readouterr().err
    check_failure(rc, err, culprits, out, before)
    if name == "two_problems":
        assert len(err.splitlines()) == 2  # both reported, one line each


@pytest.mark.parametrize("name", ["malformed_yaml", "label_outside"])
def test_bad_train_input_real_process(name, tmp_path, good_recipe, tiny_data):
    """The installed console script: no traceback, exit 2, nothing written (one early and one late failure)."""
    argv, culprits, out = bad_case(name, tmp_path, good_recipe, tiny_data)
    proc = run_cli("train", *argv)
    check_failure(proc.returncode, proc.stderr, culprits, out, None)
    assert proc.stdout == ""


# Values out of range, or that transformers, trl or torch would refuse later (often after the model loaded, or as a
# traceback in a DataLoader): each its own case, reported by the recipe parse before torch is imported.
BAD_VALUES = {
    "train_batch_negative": (["--per_device_train_batch_size", "-3"], "per_device_train_batch_size"),
    "eval_batch_zero": (["--per_device_eval_batch_size", "0"], "per_device_eval_batch_size"),
    "accumulation_zero": (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
    "lr_zero": (["--learning_rate", "0"], "learning_rate"),
    "lr_negative": (["--learning_rate", "-1e-4"], "learning_rate"),
    "epochs_negative": (["--num_train_epochs", "-1"], "num_train_epochs"),
    "epochs_zero_without_max_steps": (["--num_train_epochs", "0", "--max_steps", "-1"], "num_train_epochs"),
    "max_steps_zero": (["--max_steps", "0"], "max_steps"),
    "lora_r_zero": (["--lora_r", "0"], "lora_r"),
    "lora_alpha_negative": (["--lora_alpha", "-8"], "lora_alpha"),
    "max_length_zero": (["--max_length", "0"], "max_length"),
    "max_target_length_zero": (["--max_target_length", "0"], "max_target_length"),
    "new_tokens_zero": (["--generation_max_new_tokens", "0"], "generation_max_new_tokens"),
    "train_samples_zero": (["--max_train_samples", "0"], "max_train_samples"),
    "dropout_above_one": (["--lora_dropout", "1.5"], "lora_dropout"),
    "eval_size_above_one": (["--eval_size", "1.2"], "eval_size"),
    "beta1_above_one": (["--adam_beta1", "1.5"], "adam_beta1"),
    "smoothing_negative": (["--label_smoothing_factor", "-0.1"], "label_smoothing_factor"),
    "warmup_negative": (["--warmup_steps", "-5"], "warmup_steps"),
    "weight_decay_negative": (["--weight_decay", "-0.1"], "weight_decay"),
    "grad_norm_negative": (["--max_grad_norm", "-1"], "max_grad_norm"),
    "epsilon_zero": (["--adam_epsilon", "0"], "adam_epsilon"),
    "save_steps_zero": (["--save_steps", "0"], "save_steps"),
    "eval_steps_negative": (["--eval_steps", "-2"], "eval_steps"),
    "logging_steps_fractional": (["--logging_steps", "2.5"], "logging_steps"),
    "save_total_limit_zero": (["--save_total_limit", "0"], "save_total_limit"),
    "workers_negative": (["--dataloader_num_workers", "-1"], "dataloader_num_workers"),
    "seed_negative": (["--seed", "-1"], "seed"),
    "seed_too_large": (["--seed", str(2**32)], "seed"),
    "strategy_unknown": (["--eval_strategy", "stepz"], "eval_strategy"),
    "scheduler_unknown": (["--lr_scheduler_type", "cosin"], "lr_scheduler_type"),
    "optimizer_unknown": (["--optim", "adamw_foo"], "optim"),
    "best_model_strategies_differ": (["--load_best_model_at_end", "true", "--eval_strategy", "steps", "--save_strategy", "epoch"],
                                     "load_best_model_at_end"),
    "eval_strategy_without_eval": (["--eval_split", "none", "--eval_strategy", "steps"], "eval_strategy"),
    "bf16_and_fp16": (["--bf16", "true", "--fp16", "true"], "bf16, fp16"),
    "augment_copies_zero": (["--augment_copies", "0"], "augment_copies"),
    "quant_type_unknown": (["--bnb_4bit_quant_type", "nf3"], "bnb_4bit_quant_type"),
}


@pytest.mark.parametrize("name", BAD_VALUES)
def test_bad_train_value(name, tmp_path, good_recipe, capsys):
    extra, culprit = BAD_VALUES[name]
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["train", str(good_recipe), "--output_dir", str(out), *extra])
    err = capsys.readouterr().err
    check_failure(rc, err, [culprit], out, None)
    assert len(err.splitlines()) == 1, err


def test_recipe_mistakes_are_reported_before_torch_loads(tmp_path, good_recipe):
    """What makes the error arrive in about a second: nothing of the ML stack is imported to find it."""
    out = tmp_path / "out"
    code = ("import sys; from lora_ft.cli import main; "
            f"rc = main(['train', {str(good_recipe)!r}, '--output_dir', {str(out)!r}, '--per_device_train_batch_size', '-3', "
            "'--lerning_rate', '1']); "
            f"print(rc, [m for m in {HEAVY!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split("\n")[0] == "2 []", proc.stdout + proc.stderr
    assert "per_device_train_batch_size" in proc.stderr and "lerning_rate" in proc.stderr
    assert not out.exists()


def test_train_without_recipe_file_takes_overrides(tmp_path, tiny_gpt2, capsys):
    """`lora-ft train --key value ...` alone: the first override's value is not mistaken for a recipe path."""
    missing = tmp_path / "absent_data"
    rc = main(["train", "--model_name_or_path", str(tiny_gpt2), "--dataset_name", str(missing), "--output_dir", str(tmp_path / "o"), "--max_length", "32"])
    err = capsys.readouterr().err
    assert rc == 2 and "absent_data" in err and "not found" not in err


def test_train_with_nothing(capsys):
    assert main(["train"]) == 2
    assert "recipe" in capsys.readouterr().err


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "builtin:smollm2-135m-instruct" in out and "builtin:minilm-l6" in out


def test_eval_column_flags_win_over_the_recipe_column_map(tiny_bert, tiny_data, tmp_path, capsys):
    """gpt2_sentiment's case: the recipe maps sentiment -> label_text; `eval --label_column sentiment` on a file that
    has `sentiment` must score that column, not rename it away first."""
    from conftest import cls_recipe, train_in_process

    rows = read_rows(tiny_data / "train.csv")
    data = tmp_path / "d"
    data.mkdir()
    write_csv(data / "train.csv", [{"text": r["text"], "sentiment": r["label"]} for r in rows])
    write_csv(data / "test.csv", [{"text": r["text"], "sentiment": r["label"]} for r in read_rows(tiny_data / "test.csv")])
    recipe = cls_recipe(tmp_path / "r.yaml", tiny_bert, data, label_column="label_text", column_map={"sentiment": "label_text"})
    run = train_in_process(recipe, tmp_path / "run", "--max_steps", "2", "--eval_strategy", "no")
    capsys.readouterr()
    assert main(["eval", str(run), "--dataset_name", str(data / "test.csv"), "--label_column", "sentiment"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_samples"] > 0


def test_disk_full_while_saving_leaves_no_half_run(tmp_path, good_recipe, capsys, monkeypatch):
    """A save that fails (ENOSPC) ends in exit 2 and one line; the run dir holds no adapter or metrics, and the
    staged files are kept where the message says (they may be the only copy of the final weights)."""
    import errno

    import lora_ft.train

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lora_ft.train, "save_recipe", full)
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["train", str(good_recipe), "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and "Traceback" not in err
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not [n for n in left if not n.startswith(("checkpoint-", "runs", ".saving"))], left
    assert f"kept in {out / '.saving'}" in err and (out / ".saving" / "adapter_model.safetensors").is_file()


def test_texts_far_beyond_max_length_are_cut_not_fatal(tmp_path, tiny_gpt2, tiny_data, capsys):
    rows = read_rows(tiny_data / "train.csv")
    rows[0]["text"] = "very long " * 5000
    data = tmp_path / "long"
    write_csv(data / "train.csv", rows)
    recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, data, max_steps=1, eval_split="none")
    assert main(["train", str(recipe), "--output_dir", str(tmp_path / "run")]) == 0


# ---------------------------------------------------------------- refusals: outputs, run dirs, trust (exit 2, one line, nothing changed)


def _foreign(path, file=False):
    """Something the user made that lora_ft must not replace."""
    if file:
        path.write_text("mine")
    else:
        path.mkdir()
        (path / "thesis.tex").write_text("mine")
    return path


def _model_folder(path, model_type="bert"):
    """Enough of a merged folder for the checks that run before any weights load."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


def _run_asking(src, tmp_path, key):
    """A copy of a trained run whose saved recipe asks for `key: true` (a shared or downloaded run dir)."""
    import shutil

    import yaml

    run = tmp_path / f"shared-{key}"
    shutil.copytree(src, run)
    recipe = yaml.safe_load((run / "lora_ft_recipe.yaml").read_text())
    recipe[key] = True
    (run / "lora_ft_recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run


def refusal_case(name, tmp_path, gpt2_run, tiny_gpt2, tiny_data):
    """(argv, substrings the error must name, the path that must stay as it was)."""
    run = str(gpt2_run.run_dir)
    if name == "merge_into_its_run":
        return ["merge", run, "--output", run], ["--output", "overlaps", run], gpt2_run.run_dir
    if name == "merge_into_runs_parent":
        parent = gpt2_run.run_dir.parent
        return ["merge", run, "--output", str(parent)], ["overlaps"], parent
    if name == "merge_over_foreign":
        out = _foreign(tmp_path / "home")
        return ["merge", run, "--output", str(out)], [str(out), "merge_report.json", "--overwrite"], out
    if name == "export_onnx_over_foreign":
        src, out = _model_folder(tmp_path / "merged"), _foreign(tmp_path / "onnx")
        return ["export", str(src), "--format", "onnx", "--output", str(out)], [str(out), "--overwrite"], out
    if name == "export_bnb4_into_source":
        src = _model_folder(tmp_path / "merged")
        return ["export", str(src), "--format", "bnb4", "--output", str(src / "q")], ["overlaps"], src
    if name == "export_gguf_over_foreign_file":
        src, out = _model_folder(tmp_path / "merged", "llama"), _foreign(tmp_path / "notes.gguf", file=True)
        return ["export", str(src), "--format", "gguf", "--output", str(out)], [str(out), "--overwrite"], out
    if name == "compress_over_foreign":
        src, out = _model_folder(tmp_path / "merged"), _foreign(tmp_path / "small")
        return ["compress", str(src), "--method", "int8", "--eval-dataset", str(tiny_data), "--output", str(out)], \
            [str(out), "compress_report.json", "--overwrite"], out
    if name == "push_dry_run_over_foreign":
        out = _foreign(tmp_path / "staged")
        return ["push", run, "--repo-id", "me/x", "--dry-run", "--output", str(out)], [str(out), "--overwrite"], out
    if name == "inspect_png_over_foreign":
        out = _foreign(tmp_path / "photo.png", file=True)
        return ["data", "inspect", str(tiny_data), "--model_name_or_path", str(tiny_gpt2), "--histogram", str(out)], \
            ["--histogram", str(out), "--overwrite"], out
    if name == "search_into_foreign":
        out = _foreign(tmp_path / "docs")
        recipe = cls_recipe(tmp_path / "r.yaml", tiny_gpt2, tiny_data)
        return ["search", str(recipe), "--n-trials", "1", "--output_dir", str(out)], ["search.db", "--overwrite"], out
    if name == "compare_over_foreign":
        out = _foreign(tmp_path / "report.html", file=True)
        return ["compare", run, "--output", str(out)], [str(out), "--overwrite"], out
    if name == "train_other_recipe":
        return ["train", str(gpt2_run.recipe), "--output_dir", run, "--learning_rate", "0.5"], \
            ["learning_rate", "--overwrite"], gpt2_run.run_dir
    if name == "predict_recipe_asks_remote_code":
        shared = _run_asking(gpt2_run.run_dir, tmp_path, "trust_remote_code")
        return ["predict", str(shared), "--text", "x"], ["trust_remote_code", "--trust-remote-code"], shared
    if name == "merge_recipe_asks_pickle":
        shared = _run_asking(gpt2_run.run_dir, tmp_path, "allow_pickle")
        out = tmp_path / "merged-out"
        return ["merge", str(shared), "--output", str(out)], ["allow_pickle", "--allow-pickle"], shared
    if name == "serve_recipe_asks_remote_code":
        shared = _run_asking(gpt2_run.run_dir, tmp_path, "trust_remote_code")
        return ["serve", str(shared)], ["trust_remote_code", "--trust-remote-code"], shared
    raise AssertionError(name)


REFUSALS = ["merge_into_its_run", "merge_into_runs_parent", "merge_over_foreign", "export_onnx_over_foreign",
            "export_bnb4_into_source", "export_gguf_over_foreign_file", "compress_over_foreign", "push_dry_run_over_foreign",
            "inspect_png_over_foreign", "search_into_foreign", "compare_over_foreign", "train_other_recipe",
            "predict_recipe_asks_remote_code", "merge_recipe_asks_pickle", "serve_recipe_asks_remote_code"]


def _snapshot(path):
    if path.is_file():
        return path.read_bytes()
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_are_one_line_and_change_nothing(name, tmp_path, gpt2_run, tiny_gpt2, tiny_data, capsys):
    argv, culprits, kept = refusal_case(name, tmp_path, gpt2_run, tiny_gpt2, tiny_data)
    before = _snapshot(kept)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lora-ft: error: ") and "Traceback" not in err, err
    for c in culprits:
        assert c in err, f"{c!r} not named in: {err}"
    assert _snapshot(kept) == before


def test_trust_flags_come_from_the_command_line(gpt2_run, tmp_path, capsys):
    """The flag the recipe asked for, given by the user, loads the run; predictions are the run's own."""
    assert main(["predict", str(gpt2_run.run_dir), "--text", "a sunny day"]) == 0
    expected = capsys.readouterr().out
    shared = _run_asking(gpt2_run.run_dir, tmp_path, "allow_pickle")
    assert main(["predict", str(shared), "--text", "a sunny day"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["predict", str(shared), "--text", "a sunny day", "--allow-pickle"]) == 0
    assert capsys.readouterr().out == expected
