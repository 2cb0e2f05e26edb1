"""Loading a finished run dir for inference, reading input texts, and generation (labelled-head predictions are\nthe task modules' `predict`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from .config import Recipe, load_run_recipe
from .errors import DataError
from .runs import require_run_dir
from .trust import NONE, Trust, granted


def load_run(run_dir: str | Path, trust: Trust = NONE):
    """(model in eval mode, tokenizer, recipe) for a run dir: base model + adapter, or a full model.

    trust: the command line's --trust-remote-code / --allow-pickle; the run dir's own recipe never grants them."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .cpu import dora as cpu_dora
    from .modeling import fix_pad_token, load_model
    from .tasks import auto_class, get_task

    p = require_run_dir(run_dir)
    recipe = granted(load_run_recipe(p), trust, p)
    a = recipe.args
    task = get_task(a.task)
    tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=a.trust_remote_code)
    fix_pad_token(tok)
    extra = task.reload_kwargs(a)
    if (p / "adapter_config.json").is_file():
        model, _ = load_model(a, auto_class(task), training=False, **extra)
        task.setup_model(model, tok)
        model = PeftModel.from_pretrained(model, str(p))
        cpu_dora.install(model)  # DoRA adapters: the weight norm once per layer, not per forward
    else:  # use_peft: false wrote a whole model
        from dataclasses import replace

        model, _ = load_model(replace(a, model_name_or_path=str(p), load_in_4bit=False, load_in_8bit=False), auto_class(task), training=False)
    if (p / "generation_config.json").is_file():  # the run's own: EOS ids as training saw them
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(p))
    model.eval()
    return model, tok, recipe


def read_texts(path: str, column: str = "text") -> list[str]:
    """Texts from a .txt (one per line), .csv, .json or .jsonl file."""
    from .data import EXTENSIONS, _read_file
    from .errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"--input {path}: file not found")
    if p.suffix.lower() == ".txt":
        try:
            return [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError:
            raise DataError(f"--input {path}: not UTF-8; re-save the file as UTF-8") from None
    if p.suffix.lower() not in EXTENSIONS:
        raise DataError(f"--input {path}: use .txt, .csv, .json or .jsonl")
    ds = _read_file(p, "input")
    if column not in ds.column_names:
        raise DataError(f"--input {path}: no column '{column}' (columns: {', '.join(ds.column_names)}); pass --text_column")
    # a list is a pre-tokenized sentence (token classification): kept as words
    return [t if isinstance(t, list) else str(t) for t in ds[column]]


def batched(items: Iterable, n: int):
    batch = []
    for x in items:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _eos_ids(model, tok, chat: bool = False) -> list[int]:
    ids = set()
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    turn_end = end_of_turn_id(tok) if chat else None
    if turn_end is not None:
        ids.add(turn_end)
    return sorted(ids)


def _render_exchange(tok, msgs: list[dict]) -> tuple[str, str]:
    """(the text up to and including the assistant's reply "y", the whole exchange)."""
    head = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True) + msgs[-1]["content"]
    return head, tok.apply_chat_template(msgs, tokenize=False)


def end_of_turn_id(tok) -> Optional[int]:
    """The token the chat template closes an assistant turn with (<|im_end|>, <|eot_id|>, <end_of_turn>), or None.

    Training labels that token, so generation must stop on it, also where the tokenizer's eos is another token
    (a base model given a chat template in the recipe: eos <|endoftext|>, turns closed by <|im_end|>).
    """
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    try:
        head, full = _render_exchange(tok, msgs)
    except Exception:  # a template that insists on a system turn, say: ask again with one
        try:
            head, full = _render_exchange(tok, [{"role": "system", "content": "s"}] + msgs)
        except Exception as e:  # without the end-of-turn token generation would not stop where training did
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise DataError(f"chat_template: rendering a user/assistant exchange failed ({why}); fix the template "
                            "(set chat_template in the recipe) so the end-of-turn token can be found") from None
    if not full.startswith(head):
        return None
    ids = tok(full[len(head):].strip(), add_special_tokens=False)["input_ids"]
    # Only an added (special) token is a reliable stop; a template closing turns with plain text has none.
    return ids[0] if ids and ids[0] in getattr(tok, "added_tokens_decoder", {}) else None


def render_prompt(tok, prompt, chat: bool, system_prompt: Optional[str] = None) -> list[int]:
    """Token ids of a prompt exactly as training saw prompts: through the chat template, or plain."""
    if chat:
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if system_prompt and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system_prompt}] + msgs
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False) else []
    return bos + tok(prompt, add_special_tokens=False)["input_ids"]


def generate_texts(model, tok, prompts: list, max_new_tokens: int = 64, temperature: float = 0.0, chat: bool = False,
                   system_prompt: Optional[str] = None, seed: int = 0, max_length: Optional[int] = None) -> list[dict]:
    """Greedy at temperature 0. Returns {"completion", "stopped", ...} per prompt; stopped = ended on EOS/end-of-turn.

    max_length: encoder-decoder sources are cut there, as training cut them (the recipe's max_length)."""
    import torch

    torch.manual_seed(seed)
    # One at a time: no padding, so outputs do not depend on batch composition (the server relies on this).
    return [generate_one(model, tok, p, max_new_tokens, temperature, chat, system_prompt, max_length) for p in prompts]


class _root_unsharded:
    """An FSDP2 model's own (root) parameters gathered for `generate`: it calls the inner model's forward, so the
    hooks that gather the root's embeddings, norm and head never fire (the layers' own hooks still do)."""

    def __init__(self, model):
        from torch.distributed.fsdp import FSDPModule

        self.model = model if isinstance(model, FSDPModule) else None

    def __enter__(self):
        if self.model is not None:
            self.model.unshard()

    def __exit__(self, *exc):
        if self.model is not None:
            self.model.reshard()


def generate_one(model, tok, prompt, max_new_tokens: int = 64, temperature: float = 0.0, chat: bool = False,
                 system_prompt: Optional[str] = None, max_length: Optional[int] = None, streamer=None,
                 stopping_criteria=None, logits_processor=None) -> dict:
    """{"completion", "stopped", "prompt_tokens", "completion_tokens"} for one prompt (a string, or chat messages).

    streamer: a transformers streamer that receives the new tokens as they are made (the server's SSE).
    stopping_criteria, logits_processor: passed to `generate` (the server's cancellation and per-request sampling)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = _eos_ids(model, tok, chat)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    encdec = getattr(model.config, "is_encoder_decoder", False)
    if encdec:
        ids = tok(prompt, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"].to(device)
    else:
        ids = torch.tensor([render_prompt(tok, prompt, chat, system_prompt)], device=device)
    kw = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, streamer=streamer)
    kw.update(do_sample=True, temperature=temperature) if temperature > 0 else kw.update(do_sample=False)
    kw.update({k: v for k, v in (("stopping_criteria", stopping_criteria), ("logits_processor", logits_processor)) if v is not None})
    try:
        with torch.no_grad(), _root_unsharded(model):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    finally:
        if was_training:
            model.train()
    new = out[0] if encdec else out[0, ids.shape[1]:]
    new = [t for t in new.tolist() if not (encdec and t == pad)] if encdec else new.tolist()
    stopped = any(t in eos for t in new)
    if stopped:
        new = new[: next(i for i, t in enumerate(new) if t in eos)]
    return {"completion": tok.decode(new, skip_special_tokens=True).strip(), "stopped": stopped,
            "prompt_tokens": int(ids.shape[1]), "completion_tokens": len(new) + int(stopped)}


def load_plain(path: str | Path, task: Optional[str] = None, trust: Trust = NONE):
    """(model in eval mode, tokenizer, recipe) for a plain HF model folder (no lora_ft_recipe.yaml: a base model, or
    one trained elsewhere). Its task is `task`, or the one whose ARCHITECTURES match config.json's architectures."""
    import json

    from transformers import AutoTokenizer

    from .config import LoraFtArguments
    from .modeling import fix_pad_token, load_model
    from .tasks import TASKS, auto_class, get_task, task_for_architectures

    p = Path(path)
    if not (p / "config.json").is_file():
        raise DataError(f"{path}: no config.json; pass a run dir, a merged folder or a HF model folder")
    archs = json.loads((p / "config.json").read_text(encoding="utf-8")).get("architectures")
    task = task or task_for_architectures(archs)
    if task is None:
        raise DataError(f"{path}: config.json architectures {archs} name no task lora_ft serves; pass --task "
                        f"({', '.join(TASKS)})")
    if task not in TASKS:
        raise DataError(f"--task {task}: use one of {', '.join(TASKS)}")
    tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust.trust_remote_code)
    fix_pad_token(tok)
    # Defaults but for these (no data, no training: nothing else applies); a chat model keeps its own template.
    chat = bool(get_task(task).GENERATES and getattr(tok, "chat_template", None))
    args = LoraFtArguments(model_name_or_path=str(p), task=task, use_peft=False, use_chat_template=chat)
    recipe = granted(Recipe(args=args, trainer={}, source=str(p)), trust, p)
    model, _ = load_model(recipe.args, auto_class(get_task(task)), training=False)
    get_task(task).setup_model(model, tok)
    model.eval()
    return model, tok, recipe
