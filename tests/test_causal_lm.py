"""Causal-LM task: exact loss masks, format detection, chat-template round trip, and the CLI end to end on a
tiny random Llama (train -> generate -> eval, memorization, continued training, QLoRA).

Runs go through `lora_ft.cli.main` in this process: the same entry point as the console script, without paying
the library import again for every command on a 2-core box.
"""

from __future__ import annotations

import functools
import json
import math

import pytest

from fixtures_gen import (  # noqa: F401  (fixtures are used by name)
    CHATML, MULTI_TURN, QA, chat_tok, json_lines, llama_models, plain_tok, write_jsonl, write_recipe,
)
import fixtures_gen
from lora_ft.cli import main
from lora_ft.config import resolve
from lora_ft.errors import DataError
from lora_ft.tasks import causal_lm
from lora_ft.tasks.causal_lm import detect_format, encode_chat, encode_plain

# Few steps, no checkpoints, no mid-run eval (the final eval still runs), fp32, fast LoRA.
FAST = {"task": "causal-lm", "max_steps": 30, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
        "eval_strategy": "no", "save_strategy": "no", "report_to": "none", "logging_steps": 1, "disable_tqdm": True,
        "bf16": False, "max_length": 64, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "learning_rate": 5e-3,
        "warmup_steps": 0, "seed": 0}


def chat_rows(pairs=QA):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def data_dir(path, rows):
    """train.jsonl and test.jsonl holding the same rows: memorization is evaluated on what was trained."""
    write_jsonl(path / "train.jsonl", rows)
    write_jsonl(path / "test.jsonl", rows)
    return path


train_run = functools.partial(fixtures_gen.train_run, fast=FAST)


def cli_json(capsys, *argv) -> list[dict]:
    """Run a lora-ft command in process; its stdout must be JSON and nothing else."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0
    return json_lines(capsys.readouterr().out)


def cli_eval(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["eval", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out)


def losses(run_dir) -> list[float]:
    history = json.loads((run_dir / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h]


def labeled_text(tok, enc) -> str:
    return tok.decode([t for t in enc["labels"] if t != -100])


# ---------------------------------------------------------------- loss masks


def test_chat_mask_is_exactly_the_assistant_turns(chat_tok):
    enc = encode_chat(chat_tok, MULTI_TURN, max_length=256)
    text = chat_tok.apply_chat_template(MULTI_TURN, tokenize=False)
    offsets = chat_tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert enc["input_ids"] == chat_tok(text, add_special_tokens=False)["input_ids"]
    # Character spans that must be trained: each assistant content plus the <|im_end|> that closes it.
    spans, at = [], 0
    for m in MULTI_TURN:
        if m["role"] == "assistant":
            start = text.index("<|im_start|>assistant\n" + m["content"] + "<|im_end|>", at) + len("<|im_start|>assistant\n")
            at = start + len(m["content"]) + len("<|im_end|>")
            spans.append((start, at))
    expected = [tid if any(s <= a and b <= e for s, e in spans) else -100
                for tid, (a, b) in zip(enc["input_ids"], offsets)]
    assert enc["labels"] == expected
    # The same, read back as text: content and end-of-turn only; no header, no newline after <|im_end|>.
    assert labeled_text(chat_tok, enc) == "Hi.<|im_end|>The sky is blue today.<|im_end|>"
    im_end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end == chat_tok.eos_token_id
    assert enc["labels"].count(im_end) == 2  # one per assistant turn; system/user <|im_end|> are masked
    assert enc["input_ids"].count(im_end) == 5


def test_chat_mask_system_and_user_tokens_are_masked(chat_tok):
    enc = encode_chat(chat_tok, MULTI_TURN, max_length=256)
    masked = chat_tok.decode([t for t, l in zip(enc["input_ids"], enc["labels"]) if l == -100])
    for m in MULTI_TURN:
        if m["role"] != "assistant":
            assert m["content"] in masked
    assert masked.count("assistant\n") == 2  # both assistant headers are context, never targets


def test_prompt_completion_plain_masks_prompt_and_adds_eos(plain_tok):
    enc = encode_plain(plain_tok, "What color is the sky?", "The sky is blue.", max_length=64)
    n_prompt = len(plain_tok("What color is the sky?", add_special_tokens=False)["input_ids"])
    completion = plain_tok("The sky is blue.", add_special_tokens=False)["input_ids"]
    assert enc["labels"] == [-100] * n_prompt + completion + [plain_tok.eos_token_id]
    assert enc["input_ids"][n_prompt:] == enc["labels"][n_prompt:]


def test_plain_text_is_all_labeled_with_eos(plain_tok):
    enc = encode_plain(plain_tok, "The sky is blue.", None, max_length=64)
    assert enc["labels"] == enc["input_ids"]
    assert enc["input_ids"][-1] == plain_tok.eos_token_id
    assert plain_tok.decode(enc["input_ids"], skip_special_tokens=True) == "The sky is blue."


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("columns, fmt", [
    (["messages", "text"], "messages"),
    (["prompt", "completion", "text"], "prompt-completion"),
    (["instruction", "context", "response"], "instruction"),
    (["text", "label"], "text"),
])
def test_detect_format(columns, fmt):
    assert detect_format(columns, "auto") == fmt


def test_detect_format_error_names_the_way_out():
    with pytest.raises(DataError, match="column_map"):
        detect_format(["question", "answer"], "auto")


def prepare(tmp_path, tok, rows, **keys):
    write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = resolve({"model_name_or_path": "unused", "task": "causal-lm", "dataset_name": str(tmp_path / "train.jsonl"),
                      "eval_split": "none", "max_length": 64, **keys})
    return causal_lm.prepare_data(recipe, tok), recipe


def test_column_map_to_prompt_completion_through_the_chat_template(tmp_path, chat_tok):
    rows = [{"question": q, "answer": a} for q, a in QA]
    data, recipe = prepare(tmp_path, chat_tok, rows, column_map={"question": "prompt", "answer": "completion"})
    assert (recipe.args.dataset_format, recipe.args.use_chat_template) == ("prompt-completion", True)
    first = data.train[0]
    assert chat_tok.decode(first["input_ids"]).startswith("<|im_start|>user\nWhat color is the sky?<|im_end|>")
    assert labeled_text(chat_tok, first) == "The sky is blue.<|im_end|>"


def test_column_map_renames_alpaca_columns(tmp_path, plain_tok):
    rows = [{"instruction": "Name a fruit.", "input": "", "output": "A banana."}]
    data, recipe = prepare(tmp_path, plain_tok, rows, column_map={"input": "context", "output": "response"})
    assert recipe.args.dataset_format == "instruction"
    assert plain_tok.decode(data.train[0]["input_ids"], skip_special_tokens=True) == (
        "### Instruction:\nName a fruit.\n\n### Response:\nA banana.")  # an empty input leaves no Input block


def test_instruction_without_template_uses_the_plain_layout(tmp_path, plain_tok):
    rows = [{"instruction": "Name a fruit.", "context": "Yellow.", "response": "A banana."}]
    data, recipe = prepare(tmp_path, plain_tok, rows)
    assert (recipe.args.dataset_format, recipe.args.use_chat_template) == ("instruction", False)
    ex = data.train[0]
    assert plain_tok.decode(ex["input_ids"], skip_special_tokens=True) == (
        "### Instruction:\nName a fruit.\n\n### Input:\nYellow.\n\n### Response:\nA banana.")
    assert ex["labels"][-1] == plain_tok.eos_token_id
    assert labeled_text(plain_tok, ex) == "A banana.</s>"


def test_system_prompt_is_context_only(tmp_path, chat_tok):
    data, _ = prepare(tmp_path, chat_tok, chat_rows(QA[:1]), system_prompt="Be brief.")
    ex = data.train[0]
    assert chat_tok.decode(ex["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert labeled_text(chat_tok, ex) == "The sky is blue.<|im_end|>"


@pytest.mark.parametrize("rows, keys, match", [
    ([{"question": "q", "answer": "a"}], {}, "cannot tell the format"),
    ([{"prompt": "q", "answer": "a"}], {"dataset_format": "prompt-completion"}, "completion.*missing.*column_map"),
    (chat_rows(QA[:1]), {"use_chat_template": False}, "chat template"),
])
def test_columns_that_do_not_fit_are_a_data_error(tmp_path, chat_tok, rows, keys, match):
    with pytest.raises(DataError, match=match):
        prepare(tmp_path, chat_tok, rows, **keys)


def test_end_of_turn_detection_template_errors(tmp_path, chat_tok):
    """A template that cannot render an exchange is refused; one that insists on a system turn is asked with one.
    Both used to give None: generation then ran past <|im_end|> wherever the eos is another token."""
    import copy

    from lora_ft.inference import end_of_turn_id

    im_end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    needs_system = copy.deepcopy(chat_tok)
    needs_system.chat_template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system turn first') }}{% endif %}" + CHATML
    assert end_of_turn_id(needs_system) == im_end == end_of_turn_id(chat_tok)
    broken = copy.deepcopy(chat_tok)
    broken.chat_template = "{{ raise_exception('this template is broken') }}"
    with pytest.raises(DataError, match="chat_template: rendering a user/assistant exchange failed .this template is broken"):
        end_of_turn_id(broken)
    with pytest.raises(DataError, match="chat_template"):  # training refuses it before any step
        prepare(tmp_path, broken, [{"prompt": "q", "completion": "a"}])


def test_messages_need_a_template(tmp_path, plain_tok):
    with pytest.raises(DataError, match="chat_template"):
        prepare(tmp_path, plain_tok, chat_rows(QA[:1]))


def test_eval_split_missing_a_column_is_a_data_error(tmp_path, plain_tok):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q", "completion": "a"}])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "q", "answer": "a"}])
    recipe = resolve({"model_name_or_path": "unused", "task": "causal-lm", "dataset_name": str(tmp_path)})
    with pytest.raises(DataError, match="completion.*missing in eval"):
        causal_lm.prepare_data(recipe, plain_tok)


# ---------------------------------------------------------------- end to end: chat run


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, llama_models):
    root = tmp_path_factory.mktemp("chat-run")
    return train_run(root, "run", llama_models[1], data_dir(root / "data", chat_rows()))


def test_chat_run_dir_layout_and_metrics(chat_run):
    for name in ("adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "lora_ft_recipe.yaml",
                 "metrics.json", "tokenizer.json"):
        assert (chat_run / name).is_file(), name
    m = json.loads((chat_run / "metrics.json").read_text())
    assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-6)
    assert m["eval_loss"] < 0.1  # memorized
    saved = (chat_run / "lora_ft_recipe.yaml").read_text()
    assert "dataset_format: messages" in saved and "use_chat_template: true" in saved


def test_chat_template_round_trip(chat_run, chat_tok):
    from transformers import AutoTokenizer

    from lora_ft.inference import render_prompt

    assert (chat_run / "chat_template.jinja").read_text() == chat_tok.chat_template == CHATML
    served = AutoTokenizer.from_pretrained(chat_run)
    assert served.chat_template == chat_tok.chat_template
    ids = render_prompt(served, "Name a fruit.", chat=True)
    msgs = [{"role": "user", "content": "Name a fruit."}]
    text = chat_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"
    assert ids == chat_tok(text, add_special_tokens=False)["input_ids"]
    # The prompt is exactly what training put before the assistant content.
    trained = encode_chat(chat_tok, msgs + [{"role": "assistant", "content": "A banana."}], 64)
    assert trained["input_ids"][: len(ids)] == ids and set(trained["labels"][: len(ids)]) == {-100}
    sys_ids = render_prompt(served, "Name a fruit.", chat=True, system_prompt="Be brief.")
    assert served.decode(sys_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_generate_reproduces_memorized_answers_and_stops(chat_run, capsys):
    argv = ["generate", chat_run, "--max_new_tokens", 24] + [x for q, _ in QA for x in ("--prompt", q)]
    out = cli_json(capsys, *argv)
    assert out == [{"prompt": q, "completion": a} for q, a in QA]
    logged = [json.loads(x) for x in (chat_run / "eval_generations.jsonl").read_text().splitlines()]
    assert logged and all(r["stopped"] and r["completion"] == r["reference"] for r in logged)


def test_eval_prints_json(chat_run, chat_tok, capsys):
    m = cli_eval(capsys, chat_run, "--dataset_name", chat_run.parent / "data", "--split", "test")
    saved = json.loads((chat_run / "metrics.json").read_text())
    assert m["split"] == "test" and m["eval_samples"] == len(QA)
    # Same tokens, same loss as the trainer's eval: each answer plus its <|im_end|>.
    assert m["eval_loss"] == pytest.approx(saved["eval_loss"], rel=1e-3, abs=1e-5)
    trained = [encode_chat(chat_tok, r["messages"], 64)["labels"] for r in chat_rows()]
    assert m["eval_tokens"] == sum(len(l) - l.count(-100) for l in trained)


def test_continue_training_from_a_run_dir(chat_run, tmp_path, llama_models):
    from safetensors.torch import load_file

    more = train_run(tmp_path, "more", llama_models[1], chat_run.parent / "data", adapter_name_or_path=str(chat_run),
                     max_steps=3, learning_rate=1e-3)
    first, again = losses(chat_run), losses(more)
    assert again[0] < first[0] / 10  # starts where the first run ended, not from the base model's loss
    assert again[0] == pytest.approx(first[-1], abs=0.05)
    before, after = load_file(chat_run / "adapter_model.safetensors"), load_file(more / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before)  # it trained further
    assert max(float((before[k] - after[k]).abs().max()) for k in before) < 0.1  # from those weights, not anew


# ---------------------------------------------------------------- end to end: plain and template-from-recipe runs


def test_plain_prompt_completion_memorizes_and_stops_on_eos(tmp_path, llama_models, capsys):
    rows = [{"prompt": q + "\n", "completion": a} for q, a in QA]
    run = train_run(tmp_path, "plain", llama_models[0], data_dir(tmp_path / "data", rows))
    assert not (run / "chat_template.jinja").exists()
    l = losses(run)
    assert l[-1] < l[0] / 20
    out = cli_json(capsys, "generate", run, *[x for r in rows for x in ("--prompt", r["prompt"])])
    assert [o["completion"] for o in out] == [a for _, a in QA]


def test_recipe_template_on_a_base_tokenizer_stops_at_end_of_turn(tmp_path, llama_models, capsys):
    """A base tokenizer (eos </s>) given ChatML in the recipe: turns end with <|im_end|>, so must generation."""
    run = train_run(tmp_path, "tmpl", llama_models[0], data_dir(tmp_path / "data", chat_rows()), chat_template=CHATML)
    assert (run / "chat_template.jinja").read_text() == CHATML
    out = cli_json(capsys, "generate", run, "--max_new_tokens", 24, *[x for q, _ in QA for x in ("--prompt", q)])
    assert [o["completion"] for o in out] == [a for _, a in QA]


def test_qlora_4bit_trains_two_steps(tmp_path, llama_models, chat_tok):
    pytest.importorskip("bitsandbytes")
    run = train_run(tmp_path, "qlora", llama_models[1], data_dir(tmp_path / "data", chat_rows()), load_in_4bit=True,
                    max_steps=2, generation_max_new_tokens=1)  # default compute dtype (bfloat16), as a user gets it
    assert (run / "adapter_model.safetensors").is_file()
    assert len(losses(run)) == 2 and all(x == x for x in losses(run))  # finite (not NaN)
    m = json.loads((run / "metrics.json").read_text())
    assert m["global_step"] == 2 and m["eval_loss"] > 0
    # The samples logged at eval obey generation_max_new_tokens: one token each here.
    logged = [json.loads(x)["completion"] for x in (run / "eval_generations.jsonl").read_text().splitlines()]
    longest_token = max(len(chat_tok.decode([i])) for i in range(len(chat_tok)))
    assert logged and all(len(c) <= longest_token for c in logged)


def test_packed_examples_do_not_see_each_other(llama_models, chat_tok):
    """Packing puts examples side by side with restarting position_ids; under the training config lora_ft sets,
    the second example's logits must equal those it gets alone (no cross-contamination)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_ft.tasks import causal_lm

    model = AutoModelForCausalLM.from_pretrained(llama_models[1])
    data = causal_lm.PreparedData(train=None, eval=None)
    from types import SimpleNamespace

    try:  # only the config side effect matters here; the trainer itself is not needed
        causal_lm.build_trainer(model, chat_tok, SimpleNamespace(), data, [])
    except Exception:
        pass
    assert model.config.use_cache is False
    model.train()
    for mod in model.modules():  # no dropout noise in the comparison
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    a, b = torch.randint(5, 100, (1, 7)), torch.randint(5, 100, (1, 5))
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        alone = model(input_ids=b).logits
        packed = model(input_ids=torch.cat([a, b], 1), position_ids=pos).logits
    assert (packed[:, 7:] - alone).abs().max() < 1e-4
