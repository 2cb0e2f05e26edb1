"""Causal-LM instruction tuning through trl's SFTTrainer.

We tokenize ourselves and hand trl `input_ids` + `labels`: the loss mask is then exact and testable
for every template, including chat templates without `{% generation %}` markers (SmolLM2's):
assistant turns (with their end-of-turn token) are trained, everything else is -100.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..cpu import lm_head as cpu_lm_head
from ..data import apply_column_map, load_eval_split, load_task_train, split_off_eval, take
from ..errors import DataError
from ..trainers import lora_ft_trainer
from .base import TOKEN_KEYS, eval_rows, generation_check, generation_snippet, no_card_lines, no_reload_kwargs, only_for

NAME = "causal-lm"
AUTO_CLASS = "AutoModelForCausalLM"
PEFT_CLASS = "AutoPeftModelForCausalLM"
PEFT_TASK_TYPE = "CAUSAL_LM"
ENCODER_DECODER = False
HAS_HEAD = False
GENERATES = True
COMBINABLE = True
predict = None  # generates: `lora-ft generate`
encode = None  # prompts are rendered one at a time for generation (inference.render_prompt)
SELECT_METRIC = "eval_loss"
COMPRESS_METRIC = "eval_perplexity"
SEARCH_SPACE = "learning_rate=loguniform(5e-5,1e-3) lora_r=choice(8,16,32) num_train_epochs=choice(1,2)"
ONNX_GRAPH = None  # causal LMs export as GGUF
PIPELINE_TAG = "text-generation"
CARD_HYPER = ("dataset_format", "use_chat_template", "packing")
SERVE_ROUTES = ("/v1/generate", "/v1/chat/completions")
ARCHITECTURES = ("ForCausalLM", "LMHeadModel")  # config architectures this task serves as a plain folder (GPT2LMHeadModel)
SERVE_FIELDS: tuple = ()
MEMORY_HEAD = "chunked"
reload_kwargs = no_reload_kwargs
card_lines = no_card_lines
export_check = generation_check


def recipe_problems(args, trainer: dict) -> list[str]:
    return only_for("sequence-classification", args, also=TOKEN_KEYS)


def training_kwargs(args) -> dict:
    return {"max_length": args.max_length}  # trl's SFTConfig cuts sequences there; lora_ft owns the key


def data_checks(tok, data, recipe) -> list:
    from ..doctor import sft_label_checks

    return sft_label_checks(tok, data, recipe)


def verify_inputs(run_dir: Path, n: int):
    return eval_rows(run_dir, GENERATIONS_FILE, "prompt", "reference", n)


def verify_logits(model, tok, inputs: list, args) -> list:
    """Next-token logits over each prompt as generation renders it (teacher forcing)."""
    import torch

    from ..inference import render_prompt

    with torch.no_grad():
        return [model(input_ids=torch.tensor([render_prompt(tok, p, bool(args.use_chat_template), args.system_prompt)[:args.max_length]]))
                .logits[0].float() for p in inputs]


def verify_metric(logits, refs, args):
    return None


def usage_snippet(adapter: bool, cls: str, head: list[str], rev: str, recipe: dict, chat: bool) -> str:
    return generation_snippet(head, cls, rev, recipe, chat)
FORMATS = ("text", "prompt-completion", "instruction", "messages")
# Prompt layout for instruction data on a model without a chat template (Alpaca style). One home.
PLAIN_INSTRUCTION = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_INSTRUCTION_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
GENERATIONS_FILE = "eval_generations.jsonl"
N_LOGGED_GENERATIONS = 3


@dataclass
class PreparedData:
    train: Any
    eval: Any
    eval_prompts: list = field(default_factory=list)  # (prompt messages or text, reference) for logged generations
    notes: list = field(default_factory=list)
    train_tokens: int = 0
    max_new_tokens: int = 64  # recipe generation_max_new_tokens, for the logged generations


def detect_format(columns: list[str], requested: str) -> str:
    if requested != "auto":
        return requested
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    if "instruction" in columns and "response" in columns:
        return "instruction"
    if "text" in columns:
        return "text"
    raise DataError(
        f"dataset_format: cannot tell the format from columns ({', '.join(columns)}); expected messages, "
        "prompt+completion, instruction+response or text; set dataset_format and column_map"
    )


REQUIRED = {"messages": ("messages",), "prompt-completion": ("prompt", "completion"),
            "instruction": ("instruction", "response"), "text": ("text",)}


def uses_chat(fmt: str, tok, requested: Optional[bool]) -> bool:
    """Chat formatting: by default whenever the data has turns and the tokenizer a chat template."""
    if requested is not None:
        return bool(requested)
    return fmt != "text" and bool(getattr(tok, "chat_template", None))


def user_prompt(row: dict, fmt: str) -> str:
    if fmt == "instruction":
        ctx = (row.get("context") or "").strip()
        return row["instruction"] + (f"\n\n{ctx}" if ctx else "")
    return row["prompt"]


def plain_prompt(row: dict, fmt: str) -> str:
    if fmt == "instruction":
        ctx = (row.get("context") or "").strip()
        tmpl = PLAIN_INSTRUCTION_WITH_INPUT if ctx else PLAIN_INSTRUCTION
        return tmpl.format(instruction=row["instruction"], context=ctx)
    return row["prompt"]


def to_messages(row: dict, fmt: str, system_prompt: Optional[str]) -> list[dict]:
    if fmt == "messages":
        msgs = [dict(m) for m in row["messages"]]
    else:
        answer = row["response"] if fmt == "instruction" else row["completion"]
        msgs = [{"role": "user", "content": user_prompt(row, fmt)}, {"role": "assistant", "content": answer}]
    if system_prompt and msgs and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def encode_chat(tok, messages: list[dict], max_length: int) -> dict:
    """input_ids and labels for a conversation; labels keep only assistant turns (end-of-turn included)."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not upto.startswith(prefix):
            raise DataError("chat_template: rendering is not prefix-stable across turns; assistant-only loss needs one that is")
        # The span ends with the end-of-turn token: whitespace a template writes after it ("<|im_end|>\n") belongs
        # to the layout between turns, and the model must learn to stop at the token, not to write a newline.
        spans.append((len(prefix), len(upto.rstrip())))
    full = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length)
    labels = [tid if any(s <= a and b <= e and b > a for s, e in spans) else -100
              for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
    return {"input_ids": enc["input_ids"], "labels": labels}


def encode_plain(tok, prompt: str, completion: Optional[str], max_length: int) -> dict:
    """Plain text (completion None: train on all of it) or prompt + completion, with EOS so generation stops."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False) else []
    p = bos + tok(prompt, add_special_tokens=False)["input_ids"]
    if completion is None:
        ids = p + [tok.eos_token_id]
        labels = list(ids)
    else:
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = p + c
        labels = [-100] * len(p) + c
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def _encode_split(ds, tok, fmt: str, chat: bool, a, where: str, notes: list):
    def fn(row):
        if chat:
            return encode_chat(tok, to_messages(row, fmt, a.system_prompt), a.max_length)
        if fmt == "text":
            return encode_plain(tok, row["text"], None, a.max_length)
        answer = row["response"] if fmt == "instruction" else row["completion"]
        return encode_plain(tok, plain_prompt(row, fmt), answer, a.max_length)

    before = len(ds)
    out = ds.map(fn, remove_columns=ds.column_names, desc=f"tokenizing {where}")
    # An example whose trained part was cut off by max_length teaches nothing: drop it, and say so.
    out = out.filter(lambda r: any(x != -100 for x in r["labels"]))
    if len(out) < before:
        notes.append(f"{where}: dropped {before - len(out)} example(s) with nothing to learn after truncation to {a.max_length} tokens")
    if len(out) == 0:
        raise DataError(f"{where}: no examples left; raise max_length or check the columns")
    return out


def _drop_empty(ds, cols, where, notes):
    before = len(ds)
    ds = ds.filter(lambda r: all(r[c] is not None and (not isinstance(r[c], str) or r[c].strip()) for c in cols))
    if len(ds) < before:
        notes.append(f"{where}: dropped {before - len(ds)} empty row(s)")
    return ds


def _require_columns(ds, fmt: str, where: str) -> None:
    missing = [c for c in REQUIRED[fmt] if c not in ds.column_names]
    if missing:
        raise DataError(f"dataset_format {fmt}: column(s) {', '.join(missing)} missing in {where} "
                        f"(columns: {', '.join(ds.column_names)}); use column_map")


def _check_chat(fmt: str, chat: bool, tok) -> None:
    """Format / template combinations that would otherwise fail mid-tokenization with a bare KeyError."""
    if chat and not getattr(tok, "chat_template", None):
        raise DataError("use_chat_template: the tokenizer has no chat template; set chat_template in the recipe")
    if fmt == "messages" and not chat:
        raise DataError("dataset_format messages: turns are laid out by a chat template; set chat_template in the recipe "
                        "(the tokenizer has none) and leave use_chat_template on")
    if fmt == "text" and chat:
        raise DataError("use_chat_template: text data has no turns to lay out; drop it, or use prompt-completion data")
    if chat:  # before training, not at the first generation: a template that cannot render an exchange is refused
        from ..inference import end_of_turn_id

        end_of_turn_id(tok)


def prepare_data(recipe, tok) -> PreparedData:
    a = recipe.args
    seed = recipe.trainer.get("seed", 42)
    train, eval_ds, notes = load_task_train(a, seed, "train")
    fmt = detect_format(train.column_names, a.dataset_format)
    _require_columns(train, fmt, "train")
    a.dataset_format = fmt
    chat = uses_chat(fmt, tok, a.use_chat_template)
    _check_chat(fmt, chat, tok)
    a.use_chat_template = chat
    train = _drop_empty(train, REQUIRED[fmt], "train", notes)
    if a.eval_split and eval_ds is None:
        train, eval_ds = split_off_eval(train, a.eval_size, seed)
        notes.append(f"no '{a.eval_split}' split: held out {len(eval_ds)} train rows (eval_size={a.eval_size}, seed={seed})")
    elif eval_ds is not None:
        eval_ds = apply_column_map(eval_ds, a.column_map, "eval")
        _require_columns(eval_ds, fmt, "eval")
        eval_ds = _drop_empty(eval_ds, REQUIRED[fmt], "eval", notes)
    train = take(train, a.max_train_samples, seed)
    eval_ds = take(eval_ds, a.max_eval_samples, seed) if eval_ds is not None else None
    prompts = []
    if eval_ds is not None and fmt != "text":
        for row in eval_ds.select(range(min(N_LOGGED_GENERATIONS, len(eval_ds)))):
            msgs = to_messages(row, fmt, a.system_prompt)
            prompts.append((msgs[:-1] if chat else plain_prompt(row, fmt), msgs[-1]["content"]))
    train_tok = _encode_split(train, tok, fmt, chat, a, "train", notes)
    eval_tok = _encode_split(eval_ds, tok, fmt, chat, a, "eval", notes) if eval_ds is not None else None
    n_tokens = int(sum(len(x) for x in train_tok["input_ids"]))
    return PreparedData(train_tok, eval_tok, prompts, notes, n_tokens, a.generation_max_new_tokens)


def model_kwargs(data) -> dict:
    return {}


def setup_model(model, tok) -> None:
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    gc = getattr(model, "generation_config", None)
    if gc is not None and gc.pad_token_id is None:
        gc.pad_token_id = tok.pad_token_id


def build_trainer(model, tok, training_args, data: PreparedData, callbacks):
    from trl import SFTTrainer

    # transformers isolates packed sequences (position_ids restarting at 0) only when no KV cache is built;
    # with use_cache on, a packed example would attend to its neighbours. Generation keeps its own setting.
    model.config.use_cache = False
    if data.eval_prompts:
        callbacks = list(callbacks) + [_generation_logger(tok, data.eval_prompts, data.max_new_tokens)]
    trainer = lora_ft_trainer(SFTTrainer)(model=model, args=training_args, train_dataset=data.train, eval_dataset=data.eval,
                                          processing_class=tok, callbacks=callbacks)
    cpu_lm_head.install(trainer.model)  # trl's CPU fallback scores every position in fp32: half of each step
    return trainer


def _generation_logger(tok, prompts, max_new_tokens: int):
    from transformers import TrainerCallback

    class LogGenerations(TrainerCallback):
        """A few greedy generations at each eval: the cheapest check that the model learned to stop."""

        def on_evaluate(self, args, state, control, model=None, **kw):
            from ..modeling import sharded_engine

            # A sharded model (FSDP, ZeRO-3) forwards only with every process taking part: all generate, one writes.
            if model is None or not (state.is_world_process_zero or sharded_engine()):
                return
            from ..inference import generate_texts
            from ..runs import live_file

            outs = generate_texts(model, tok, [p for p, _ in prompts], max_new_tokens, chat=isinstance(prompts[0][0], list))
            if not state.is_world_process_zero:
                return
            path = live_file(args.output_dir, GENERATIONS_FILE)
            with open(path, "a", encoding="utf-8") as fh:
                for (p, ref), o in zip(prompts, outs):
                    rec = {"step": state.global_step, "prompt": p if isinstance(p, str) else p[-1]["content"],
                           "completion": o["completion"], "stopped": o["stopped"], "reference": ref}
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            print(f"[lora_ft] step {state.global_step} sample: {outs[0]['completion'][:120]!r}", flush=True)

    return LogGenerations()


def final_eval(trainer, data: PreparedData, run_dir: Path) -> dict:
    m = trainer.evaluate()
    loss = m.get("eval_loss")
    out = {"eval_loss": loss, "eval_samples": len(data.eval)}
    if loss is not None:
        out["eval_perplexity"] = math.exp(min(loss, 50.0))
    return out


def evaluate_run(model, tok, recipe, split: Optional[str] = None) -> dict:
    """`lora-ft eval` for a causal run: loss and perplexity on the assistant/completion tokens of a split."""
    import torch

    a = recipe.args
    split = split or a.eval_split or "test"
    ds = apply_column_map(load_eval_split(a.dataset_name, split, a.dataset_config), a.column_map, split)
    _require_columns(ds, a.dataset_format, split)
    ds = take(_drop_empty(ds, REQUIRED[a.dataset_format], split, []), a.max_eval_samples, recipe.trainer.get("seed", 42))
    enc = _encode_split(ds, tok, a.dataset_format, bool(a.use_chat_template), a, split, [])
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for row in enc:
            ids = torch.tensor([row["input_ids"]], device=device)
            labels = torch.tensor([row["labels"]], device=device)
            n = int((labels[:, 1:] != -100).sum())
            if n:
                total += float(model(input_ids=ids, labels=labels).loss) * n
                count += n
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count,
            "eval_samples": len(enc), "dataset": a.dataset_name, "split": split}
