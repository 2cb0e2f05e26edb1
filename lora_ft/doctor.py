"""Pre-flight checks for the traps fine-tuning keeps hitting, from the recipe, tokenizer, model config and data only.

`lora-ft doctor RECIPE` prints them all; `lora-ft train` runs the same checks before any weights load and stops
on a failing one. Each check passes, warns (lora_ft copes, the user should know) or fails (the run would be wrong).
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from typing import Optional

from .errors import LoraFtError

PASS, WARN, FAIL = "pass", "warn", "fail"
DATA_SAMPLE = 64  # rows tokenized per split for the data checks; label and emptiness checks see every row


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fixed: bool = False  # a warning lora_ft resolves itself: doctor shows it, train does not repeat it

    def line(self, width: int = 22) -> str:
        return f"{self.name:{width}s} {self.status:6s} {self.detail}"


def static_checks(recipe, engine: Optional[str] = None) -> tuple[list[Check], dict]:
    """Checks from tokenizer files and model config (no weights). Returns (checks, context for data_checks).
    engine: ddp, fsdp, fsdp1, zero2 or zero3 (`--accelerate_config`); by default the one accelerate launched, if any."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from . import engines
    from .modeling import HEAD_NAMES, check_weights_safe, resolve_model_path

    a = recipe.args
    out: list[Check] = [Check("recipe", WARN, note) for note in recipe.notes]  # inert keys: said, never dropped silently
    path = resolve_model_path(a.model_name_or_path)
    try:
        check_weights_safe(path, a.allow_pickle)
        config = AutoConfig.from_pretrained(path, trust_remote_code=a.trust_remote_code)
        raw_tok = AutoTokenizer.from_pretrained(path, trust_remote_code=a.trust_remote_code)
    except LoraFtError as e:
        return out + [Check("model", FAIL, str(e))], {}
    except (OSError, ValueError) as e:
        return out + [Check("model", FAIL, f"model_name_or_path: cannot read '{a.model_name_or_path}' ({str(e).splitlines()[0][:160]}); "
                                     "check the path or Hub id")], {}
    out.append(Check("model", PASS, f"{a.model_name_or_path}: {config.model_type}, config and tokenizer read, no weights loaded"))
    if a.trust_remote_code:
        out.append(Check("remote code", WARN, "trust_remote_code: true runs Python from the model repo; keep it off unless you trust it"))

    from .tasks import get_task

    task = get_task(a.task)
    decoder = not getattr(config, "is_encoder_decoder", False) and not task.ENCODER_DECODER
    if task.HAS_HEAD:
        if raw_tok.pad_token is None:
            out.append(Check("pad token", WARN, f"the tokenizer has no pad token: lora_ft sets pad = {raw_tok.eos_token!r} in the tokenizer "
                                                "and pad_token_id in the model config (both saved with the run)", fixed=True))
        else:
            out.append(Check("pad token", PASS, f"pad token {raw_tok.pad_token!r}"))
    positions = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx") if getattr(config, k, None)), None)
    if positions and a.max_length > positions:
        out.append(Check("max_length", FAIL, f"max_length {a.max_length} > the model's {positions} positions; set max_length <= {positions}"))
    else:
        out.append(Check("max_length", PASS, f"max_length {a.max_length}" + (f" <= {positions} positions" if positions else " (relative positions)")))

    engine = engine or engines.from_environment(recipe.trainer)
    if engine:
        out.append(Check("engine", *engines.verdict(engine, config, torch.cuda.is_available())))
    if engine and a.load_in_8bit and engine in ("fsdp", "fsdp1", "zero3"):
        out.append(Check("quantization", FAIL, f"load_in_8bit with {engine}: peft documents QLoRA sharding for 4-bit only; use load_in_4bit"))
    elif engine and a.load_in_4bit and engine in ("fsdp", "fsdp1", "zero3"):
        out.append(Check("quantization", WARN, f"4-bit with {engine}: needs bnb_4bit_quant_storage equal to the compute dtype "
                                               f"({a.bnb_4bit_compute_dtype}) so shards are uniform; lora_ft sets it when accelerate "
                                               "launches with FSDP / ZeRO-3 (recipes/accelerate/fsdp_qlora.yaml)", fixed=True))
    elif a.load_in_4bit or a.load_in_8bit:
        out.append(Check("quantization", PASS, f"{'4' if a.load_in_4bit else '8'}-bit base via bitsandbytes" + (f" with {engine}" if engine else "")))

    if task.HAS_HEAD and a.use_peft:
        try:
            out.append(_head_check(config, path, a, HEAD_NAMES, task.AUTO_CLASS))
        except Exception as e:  # an architecture that cannot be built on the meta device: say so, do not block
            out.append(Check("classifier head", WARN, f"not checked for this architecture ({type(e).__name__})"))
    out.append(_memory_check(config, recipe))
    return out, {"config": config, "raw_tok": raw_tok, "decoder": decoder}


def _head_check(config, path: str, a, head_names, auto_class: str) -> Check:
    """The classifier head must be trained and saved: new heads go to modules_to_save; a head the checkpoint
    already has stays frozen under LoRA unless listed, which silently trains nothing on top."""
    import torch
    import transformers

    config = copy.deepcopy(config)
    config.num_labels = len(a.labels) if a.labels else 2
    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(config)
    heads = sorted({name.split(".")[0] for name, _ in model.named_parameters() if name.split(".")[0] in head_names})
    saved = _checkpoint_keys(path)
    wanted = set(a.lora_modules_to_save or [])
    from_ckpt = [h for h in heads if any(k == h or k.startswith(h + ".") for k in saved)]
    new = [h for h in heads if h not in from_ckpt]
    if from_ckpt and not set(from_ckpt) <= wanted:
        return Check("classifier head", WARN, f"head {', '.join(from_ckpt)} comes with the checkpoint and would stay frozen under LoRA; "
                                              f"add it to lora_modules_to_save to train and save it")
    if not heads:
        return Check("classifier head", WARN, f"no head named {'/'.join(head_names)} found; list yours in lora_modules_to_save")
    return Check("classifier head", PASS, f"{', '.join(heads)} {'new: ' if new else ''}trained and saved via modules_to_save")


def _checkpoint_keys(path: str) -> set[str]:
    from pathlib import Path

    keys: set[str] = set()
    p = Path(path)
    if not p.is_dir():  # a Hub id: heads are judged new (the usual case for a base model)
        return keys
    from safetensors import safe_open

    for f in p.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:  # reads the header only
            keys.update(st.keys())
    return keys


def _memory_check(config, recipe) -> Check:
    import torch

    from .memory import activation_bytes, device_memory_gb, estimate, head_kind, recipe_mode, weight_bytes

    a, t = recipe.args, recipe.trainer
    mode = recipe_mode(a)
    where, avail = device_memory_gb()
    try:
        est = estimate(config, batch_size=int(t.get("per_device_train_batch_size", 8)), seq_len=a.max_length, mode=mode,
                       lora_r=a.lora_r, dtype_bytes=weight_bytes(a),
                       gradient_checkpointing=bool(t.get("gradient_checkpointing")),
                       lm_head=head_kind(a.task), act_bytes=activation_bytes(t), cuda=torch.cuda.is_available())
    except Exception as e:  # an architecture AutoModel cannot build on meta: say so, do not block
        return Check("memory", WARN, f"no estimate for this architecture ({type(e).__name__})")
    detail = f"estimated peak {est.total_gb:.1f} GiB ({mode}, batch {t.get('per_device_train_batch_size', 8)} x {a.max_length} tokens) vs {avail:.1f} GiB {where}"
    if est.total_gb > avail:
        return Check("memory", FAIL, detail + "; lower per_device_train_batch_size or max_length, or use load_in_4bit / gradient_checkpointing")
    if est.total_gb > 0.8 * avail:
        return Check("memory", WARN, detail + "; little headroom")
    return Check("memory", PASS, detail)


def data_checks(recipe, tok, task) -> tuple[list[Check], object]:
    """Load and prepare a sample of the data as training will; then the label checks for SFT. Returns (checks, data)."""
    r = copy.deepcopy(recipe)
    a = r.args
    a.max_train_samples = min(a.max_train_samples or DATA_SAMPLE, DATA_SAMPLE)
    a.max_eval_samples = min(a.max_eval_samples or DATA_SAMPLE, DATA_SAMPLE)
    try:
        data = task.prepare_data(r, tok)
    except LoraFtError as e:
        return [Check("data", FAIL, str(e))], None
    n_eval = len(data.eval) if data.eval is not None else 0
    notes = "; ".join(data.notes)
    out = [Check("data", WARN if any("dropped" in n for n in data.notes) else PASS,
                 f"{a.dataset_name}: sample of {len(data.train)} train / {n_eval} eval rows prepared" + (f" ({notes})" if notes else ""))]
    out += task.data_checks(tok, data, r)
    return out, data


def sft_label_checks(tok, data, recipe) -> list[Check]:
    from .inference import end_of_turn_id

    a = recipe.args
    stops = {t for t in (tok.eos_token_id, end_of_turn_id(tok) if a.use_chat_template else None) if t is not None}
    rows = data.train.select(range(min(len(data.train), DATA_SAMPLE)))
    missing = sum(1 for r in rows if not stops & {t for t in r["labels"] if t != -100})
    names = ", ".join(repr(tok.convert_ids_to_tokens(t)) for t in sorted(stops)) or "none"
    out = [Check("eos in labels", FAIL if missing == len(rows) else WARN if missing else PASS,
                 f"{len(rows) - missing}/{len(rows)} sampled examples train the stop token ({names})"
                 + ("; generation will not stop: check eos_token / chat template" if missing == len(rows) else
                    "; the others were cut by max_length" if missing else ""))]
    if a.use_chat_template:
        out.append(chat_template_check(tok, a))
    return out


def chat_template_check(tok, a) -> Check:
    """The template saved with the run renders a prompt exactly as training encoded it, prompt tokens untrained."""
    from .inference import render_prompt
    from .tasks.causal_lm import encode_chat

    msgs = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A banana."}]
    trained = encode_chat(tok, msgs, a.max_length)
    with tempfile.TemporaryDirectory() as d:  # what the run dir will hold, read back as serving reads it
        tok.save_pretrained(d)
        from transformers import AutoTokenizer

        served = AutoTokenizer.from_pretrained(d)
    prompt = render_prompt(served, msgs[0]["content"], chat=True)
    same = served.chat_template == tok.chat_template and trained["input_ids"][: len(prompt)] == prompt
    masked = set(trained["labels"][: len(prompt)]) == {-100}
    return Check("chat template", PASS if same and masked else FAIL,
                 "saved template renders prompts exactly as training did; prompt tokens masked" if same and masked else
                 "the saved template renders prompts differently from training (or trains on the prompt); "
                 "set chat_template in the recipe")


def run_doctor(recipe, engine: Optional[str] = None) -> list[Check]:
    from .modeling import load_tokenizer
    from .tasks import get_task

    checks = [Check("recipe", PASS, f"{len(recipe.args.__dict__) + len(recipe.trainer)} keys valid, task {recipe.args.task}")]
    static, ctx = static_checks(recipe, engine)
    checks += static
    if not ctx:
        return checks
    data, _ = data_checks(recipe, load_tokenizer(recipe.args), get_task(recipe.args.task))
    return checks + data


def blocking(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status == FAIL]
