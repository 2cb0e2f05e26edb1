"""Sequence classification end to end on tiny models: the run dir, its metrics, and a head that survives reload."""

from __future__ import annotations

import json

import pytest

from conftest import LABELS, cls_recipe, json_lines, read_rows, train_in_process
from lora_ft.cli import main
from lora_ft.config import load_run_recipe

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
EXTRA_TEXTS = ["ok", "The train was late again and nobody told us why, which was frustrating. " * 3, "café ☕ naïve – “quotes”"]


def predict(capsys, run_dir, texts: list[str]) -> list[dict]:
    """`lora-ft predict RUN --text ...` in process; stdout must be JSON lines only."""
    args = ["predict", str(run_dir)]
    for t in texts:
        args += ["--text", t]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    return json_lines(out)


def eval_rows(run_dir) -> list[dict]:
    return json_lines((run_dir / "eval_predictions.jsonl").read_text(encoding="utf-8"))


def assert_same_predictions(ours: list[dict], theirs: list[list[float]], names: list[str], tol: float):
    for row, probs in zip(ours, theirs, strict=True):
        best = max(range(len(names)), key=lambda j: probs[j])
        assert row["label"] == names[best], (row, probs)
        for j, n in enumerate(names):
            assert row["scores"][n] == pytest.approx(probs[j], abs=tol)


# ---------------------------------------------------------------- the run dir


def test_run_dir_layout(gpt2_run):
    d = gpt2_run.run_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "lora_ft_recipe.yaml", "metrics.json",
                 "confusion_matrix.json", "confusion_matrix.png", "loss_curve.png", "eval_predictions.jsonl",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (d / name).is_file(), f"{name} missing from the run dir"
    for png in ("confusion_matrix.png", "loss_curve.png"):
        assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pickles = [p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES]
    assert pickles == [], f"pickles at the top of the run dir: {pickles}"
    adapter = json.loads((d / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS"
    assert adapter["r"] == 8  # --lora_r 8 on the command line beat the recipe's 4
    assert "score" in adapter["modules_to_save"]  # GPT-2's fresh head is trained fully and saved


def test_saved_recipe_is_resolved(gpt2_run):
    r = load_run_recipe(gpt2_run.run_dir)
    assert r.args.labels == LABELS
    assert r.learning_rate == 1e-2 and r.args.lora_r == 8  # overrides recorded
    assert r.args.model_name_or_path == str(gpt2_run.base)
    assert r.max_steps == 4


def test_metrics(gpt2_run, tiny_data):
    m = json.loads((gpt2_run.run_dir / "metrics.json").read_text())
    for key in ("eval_accuracy", "eval_macro_f1", "eval_loss", "train_runtime", "train_samples_per_second",
                "train_tokens_per_second", "peak_memory_mb", "train_loss"):
        assert isinstance(m.get(key), (int, float)), f"metrics.json: {key} = {m.get(key)!r}"
    assert m["train_tokens_per_second"] > 0 and m["peak_memory_mb"] > 0 and m["train_runtime"] > 0
    assert m["global_step"] == 4
    n_eval = len(read_rows(tiny_data / "test.csv"))
    assert m["eval_samples"] == n_eval
    assert sum(v["support"] for v in m["eval_per_class"].values()) == n_eval

    rows = eval_rows(gpt2_run.run_dir)
    assert [r["text"] for r in rows] == [r["text"] for r in read_rows(tiny_data / "test.csv")]
    assert [r["label"] for r in rows] == [r["label"] for r in read_rows(tiny_data / "test.csv")]
    assert m["eval_accuracy"] == pytest.approx(sum(r["label"] == r["pred"] for r in rows) / n_eval)
    from sklearn.metrics import f1_score

    assert m["eval_macro_f1"] == pytest.approx(f1_score([r["label"] for r in rows], [r["pred"] for r in rows],
                                                        labels=LABELS, average="macro", zero_division=0))
    cm = json.loads((gpt2_run.run_dir / "confusion_matrix.json").read_text())
    assert cm["labels"] == LABELS
    for i, t in enumerate(LABELS):
        for j, p in enumerate(LABELS):
            assert cm["matrix"][i][j] == sum(r["label"] == t and r["pred"] == p for r in rows)


def test_loss_is_logged_every_step(gpt2_run):
    history = json.loads((gpt2_run.run_dir / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 4 and all(x > 0 for x in losses)


# ---------------------------------------------------------------- the head survives reload


@pytest.mark.parametrize("run_name", ["gpt2_run", "bert_run", "llama_run"])
def test_predict_reproduces_train_time_eval(run_name, request, capsys):
    """The model served from the run dir is the one evaluated at the end of training."""
    run = request.getfixturevalue(run_name)
    rows = eval_rows(run.run_dir)
    got = predict(capsys, run.run_dir, [r["text"] for r in rows])
    assert len(got) == len(rows)
    for g, r in zip(got, rows):
        assert g["text"] == r["text"]
        assert g["score"] == pytest.approx(r["score"], abs=1e-4)
        top2 = sorted(g["scores"].values())[-2:]
        assert g["label"] == r["pred"] or top2[1] - top2[0] < 1e-4  # a near tie may flip across batch layouts


@pytest.mark.parametrize("run_name", ["gpt2_run", "bert_run", "llama_run"])
def test_plain_peft_reload_matches_predict(run_name, request, capsys):
    """A user with only peft and transformers gets the same predictions as `lora-ft predict`."""
    import torch
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    run = request.getfixturevalue(run_name)
    texts = [r["text"] for r in eval_rows(run.run_dir)[:12]] + EXTRA_TEXTS
    ours = predict(capsys, run.run_dir, texts)
    assert [o["text"] for o in ours] == texts

    saved = load_run_recipe(run.run_dir).args
    names = saved.labels
    kw = dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    tok = AutoTokenizer.from_pretrained(run.run_dir)
    cut = dict(truncation=True, max_length=saved.max_length, return_tensors="pt")  # as trained (some texts are longer)
    assert max(len(tok(t)["input_ids"]) for t in texts) > saved.max_length  # so the cut is exercised
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(run.run_dir), **kw).eval()
    with torch.no_grad():  # one text at a time: no padding, so no pad_token_id needed
        single = [model(**tok(t, **cut)).logits.softmax(-1)[0].tolist() for t in texts]
    assert_same_predictions(ours, single, names, tol=1e-5)

    # Batched, the base config needs the pad id that lora_ft sets; the run dir's tokenizer carries it.
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(run.run_dir), pad_token_id=tok.pad_token_id, **kw).eval()
    with torch.no_grad():
        batch = model(**tok(texts, padding=True, **cut)).logits.softmax(-1).tolist()
    assert_same_predictions(ours, batch, names, tol=1e-5)


@pytest.mark.parametrize("run_name", ["gpt2_run", "llama_run"])
def test_pad_token_fix_is_saved(run_name, request):
    """GPT-2/Llama tokenizers ship without a pad token: the run dir's tokenizer has one, the model config knows it."""
    from transformers import AutoTokenizer

    from lora_ft.inference import load_run

    run = request.getfixturevalue(run_name)
    assert AutoTokenizer.from_pretrained(run.base).pad_token is None  # the fixture really lacks one
    saved = AutoTokenizer.from_pretrained(run.run_dir)
    assert saved.pad_token is not None and saved.pad_token_id == saved.eos_token_id
    assert len(saved) == len(AutoTokenizer.from_pretrained(run.base))  # reused eos: no new embedding row
    model, tok, _ = load_run(run.run_dir)
    assert model.config.pad_token_id == tok.pad_token_id == saved.pad_token_id


def test_bert_keeps_its_own_pad_token(bert_run):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(bert_run.run_dir).pad_token == "[PAD]"
    adapter = json.loads((bert_run.run_dir / "adapter_config.json").read_text())
    assert "classifier" in adapter["modules_to_save"]


def test_predict_output_shape(gpt2_run, capsys):
    rows = predict(capsys, gpt2_run.run_dir, EXTRA_TEXTS)
    assert [r["text"] for r in rows] == EXTRA_TEXTS
    for r in rows:
        assert set(r) == {"text", "label", "score", "scores"}
        assert list(r["scores"]) == LABELS  # id order, as saved
        assert r["label"] == max(r["scores"], key=r["scores"].get)
        assert r["score"] == r["scores"][r["label"]]
        assert sum(r["scores"].values()) == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------- full fine-tuning, seeds


@pytest.mark.parametrize("base_name", ["tiny_bert", "tiny_gpt2"])
def test_full_finetune_without_peft(base_name, request, tmp_path, tiny_data, capsys):
    recipe = cls_recipe(tmp_path / "full.yaml", request.getfixturevalue(base_name), tiny_data, use_peft=False, max_steps=2)
    run_dir = train_in_process(recipe, tmp_path / "run")
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "config.json").is_file()
    assert not (run_dir / "adapter_config.json").exists()
    assert not [p.name for p in run_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
    config = json.loads((run_dir / "config.json").read_text())
    assert list(config["id2label"].values()) == LABELS
    from transformers import AutoTokenizer

    assert config["pad_token_id"] == AutoTokenizer.from_pretrained(run_dir).pad_token_id  # GPT-2: the eos fix, saved

    rows = eval_rows(run_dir)
    got = predict(capsys, run_dir, [r["text"] for r in rows])
    assert [g["score"] for g in got] == pytest.approx([r["score"] for r in rows], abs=1e-4)

    import torch
    from transformers import AutoModelForSequenceClassification

    tok = AutoTokenizer.from_pretrained(run_dir)
    model = AutoModelForSequenceClassification.from_pretrained(run_dir).eval()
    texts = [r["text"] for r in rows[:8]] + EXTRA_TEXTS
    with torch.no_grad():
        probs = model(**tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")).logits.softmax(-1).tolist()
    assert_same_predictions(predict(capsys, run_dir, texts), probs, LABELS, tol=1e-5)


def test_same_seed_same_run(tmp_path, tiny_gpt2, tiny_data):
    """The fresh head and LoRA init are seeded: one recipe, one result."""
    from safetensors.torch import load_file

    recipe = cls_recipe(tmp_path / "seeded.yaml", tiny_gpt2, tiny_data, max_steps=2, eval_split="none")
    a = train_in_process(recipe, tmp_path / "a")
    b = train_in_process(recipe, tmp_path / "b")
    c = train_in_process(recipe, tmp_path / "c", "--seed", "7")

    def losses(d):
        return [h["loss"] for h in json.loads((d / "log_history.json").read_text()) if "loss" in h]

    assert losses(a) == losses(b)
    wa, wb, wc = (load_file(d / "adapter_model.safetensors") for d in (a, b, c))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
    assert any(not wa[k].equal(wc[k]) for k in wa)  # the seed matters
    assert not (a / "eval_predictions.jsonl").exists()  # eval_split: none
    assert "eval_accuracy" not in json.loads((a / "metrics.json").read_text())


def test_source_template_is_applied_in_training_and_serving(tmp_path, tiny_gpt2, tiny_data, capsys):
    """A prompt around the text (decoder classifiers read the last token) is the same at train, eval and predict time."""
    template = "Text: {text}\nLabel:"
    recipe = cls_recipe(tmp_path / "tmpl.yaml", tiny_gpt2, tiny_data, max_steps=2, source_template=template)
    run_dir = train_in_process(recipe, tmp_path / "run")
    assert load_run_recipe(run_dir).args.source_template == template
    rows = eval_rows(run_dir)
    got = predict(capsys, run_dir, [r["text"] for r in rows])
    assert [g["text"] for g in got] == [r["text"] for r in rows]  # outputs name the user's text, not the prompt
    assert all(g["score"] == pytest.approx(r["score"], abs=1e-4) for g, r in zip(got, rows))

    # The template really reaches the model: scores differ from the same texts without it.
    import torch

    from lora_ft.inference import load_run
    from lora_ft.tasks.classification import predict as classify

    model, tok, saved = load_run(run_dir)
    texts = [r["text"] for r in rows[:6]]
    with torch.no_grad():
        bare = model(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    templated = torch.tensor([[p["scores"][n] for n in LABELS] for p in classify(model, tok, texts, saved)])
    assert not torch.allclose(bare, templated, atol=1e-3)


def test_head_init_from_label_words(tmp_path, tiny_gpt2, tiny_bert, tiny_llama, tiny_data):
    """The head starts as the LM's scores for each label's first token; models or labels without them are refused."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from conftest import write_csv
    from lora_ft.errors import RecipeError
    from lora_ft.modeling import fix_pad_token
    from lora_ft.tasks.classification import init_head_from_label_words, label_kwargs

    words = ["bad", "fine", "happy"]  # distinct first tokens in the tiny BPE (" negative"/" neutral" share " ne")
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    fix_pad_token(tok)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, **label_kwargs(words))
    init_head_from_label_words(model, tok, words, str(tiny_gpt2))
    ids = [tok(" " + n, add_special_tokens=False)["input_ids"][0] for n in words]
    assert model.score.weight.equal(model.get_input_embeddings().weight[ids])  # GPT-2 ties its LM head
    with pytest.raises(RecipeError, match="share a first token"):
        init_head_from_label_words(model, tok, LABELS, str(tiny_gpt2))

    bert = AutoModelForSequenceClassification.from_pretrained(tiny_bert, **label_kwargs(words))
    with pytest.raises(RecipeError, match="score"):
        init_head_from_label_words(bert, AutoTokenizer.from_pretrained(tiny_bert), words, str(tiny_bert))
    llama = AutoModelForSequenceClassification.from_pretrained(tiny_llama, **label_kwargs(words))  # untied, no lm_head saved
    with pytest.raises(RecipeError, match="lm_head"):
        init_head_from_label_words(llama, AutoTokenizer.from_pretrained(tiny_llama), words, str(tiny_llama))

    # Through a real run: the saved head is one small step from the label rows, not a random init.
    rename = dict(zip(LABELS, words))
    rows = [{**r, "label": rename[r["label"]]} for r in read_rows(tiny_data / "train.csv")]
    data = tmp_path / "data"
    write_csv(data / "train.csv", rows)
    recipe = cls_recipe(tmp_path / "lw.yaml", tiny_gpt2, data, labels=words, max_steps=2, warmup_steps=0, head_init="label_words",
                        source_template="{text} Sentiment:", eval_split="none")
    run_dir = train_in_process(recipe, tmp_path / "run")
    from safetensors.torch import load_file

    head = next(v for k, v in load_file(run_dir / "adapter_model.safetensors").items() if "score" in k)
    assert head.shape == model.score.weight.shape
    assert 0 < (head - model.score.weight).abs().max() < 0.1
