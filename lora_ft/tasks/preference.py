"""Preference tuning (DPO, IPO, ORPO, SimPO, KTO) of a LoRA/QLoRA adapter through trl's trainers.

A preference run is a causal-LM adapter run: chat template, system prompt, end-of-turn token, generation, serving,
merging, GGUF export and push are the causal-LM task's (imported from `causal_lm`, not copied). What differs is the
data (pairs, or KTO's labelled completions), the trainer, and the metrics.

- `preference_method` picks trl's trainer and the trainer-arguments class a recipe's keys are checked against
  (`trainer_kind`): dpo and ipo (`loss_type: ipo`) -> DPOConfig, orpo -> ORPOConfig, simpo (CPO with
  `loss_type: simpo`, `cpo_alpha: 0`) -> CPOConfig, kto -> KTOConfig. trl 1.16 keeps ORPO and CPO under
  `trl.experimental`.
- Reference model: the base with the adapter disabled (peft), never a second copy of the weights. trl copies a
  starting adapter into a frozen "ref" adapter; a fresh adapter starts as the identity, so that copy is dropped and
  the adapter is switched off instead. Continuing an SFT adapter (`adapter_name_or_path`) keeps the copy: the
  reference is then the SFT model, as alignment-handbook's SFT -> DPO recipe has it.
- Data: lora_ft renders every pair with the chat template and system prompt exactly as SFT and `lora-ft generate`
  do (`causal_lm.encode_chat` / `encode_plain`), drops empty, equal and too-long pairs (counted), and hands trl
  the messages; trl tokenizes them with the same template.
- Metrics: the final and the before-training figures are lora_ft's own, one definition for every method, on the
  eval pairs: implicit-reward accuracy and margin, summed log-probs of chosen and rejected, and log-prob margin
  accuracy (chosen more likely than rejected). The starting model is the reference, so its log-probs are scored once
  before training and reused as the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..cpu import lm_head as cpu_lm_head
from ..data import apply_column_map, load_eval_split, load_task_train, split_off_eval, take
from ..errors import DataError
from ..trainers import lora_ft_trainer
from . import causal_lm
from .base import TOKEN_KEYS, only_for

NAME = "preference"
AUTO_CLASS = causal_lm.AUTO_CLASS
PEFT_CLASS = causal_lm.PEFT_CLASS
PEFT_TASK_TYPE = causal_lm.PEFT_TASK_TYPE
ENCODER_DECODER = False
HAS_HEAD = False
GENERATES = True
COMBINABLE = True
predict = None
encode = None
SELECT_METRIC = "eval_reward_accuracy"
COMPRESS_METRIC = "eval_reward_accuracy"
SEARCH_SPACE = "learning_rate=loguniform(1e-5,5e-4) beta=choice(0.05,0.1,0.3)"
ONNX_GRAPH = None
PIPELINE_TAG = causal_lm.PIPELINE_TAG
CARD_HYPER = ("preference_method", "beta", "loss_type", "use_chat_template")
SERVE_ROUTES = causal_lm.SERVE_ROUTES
ARCHITECTURES = ()  # a plain HF causal-LM folder is served as causal-lm: preference is a way of training, not of serving
# Memory: two sequences per example (chosen, rejected) plus a no-grad reference pass (counted for orpo/simpo too,
# which skip it: the estimate errs high there).
MEMORY_HEAD = "paired-reference"
setup_model = causal_lm.setup_model
reload_kwargs = causal_lm.reload_kwargs
export_check = causal_lm.export_check
verify_inputs = causal_lm.verify_inputs
verify_logits = causal_lm.verify_logits
verify_metric = causal_lm.verify_metric
usage_snippet = causal_lm.usage_snippet
model_kwargs = causal_lm.model_kwargs

# method: (trainer-arguments kind in lora_ft.trainer_keys, trainer "module:Class", loss_type it implies or None)
METHODS = {
    "dpo": ("dpo", "trl:DPOTrainer", None),
    "ipo": ("dpo", "trl:DPOTrainer", "ipo"),
    "orpo": ("orpo", "trl.experimental.orpo:ORPOTrainer", None),
    "simpo": ("cpo", "trl.experimental.cpo:CPOTrainer", "simpo"),
    "kto": ("kto", "trl:KTOTrainer", None),
}
DEFAULT_METHOD = "dpo"
REFERENCE_FREE = ("orpo", "simpo")  # their implicit reward is beta x mean token log-prob, no reference model
FORMATS = ("auto", "preference", "implicit-preference", "unpaired")


def method_of(raw) -> str:
    m = raw.get("preference_method", DEFAULT_METHOD) if isinstance(raw, dict) else raw.preference_method
    return m if m in METHODS else DEFAULT_METHOD


def trainer_kind(raw: dict) -> str:
    """The trainer-arguments kind whose keys a recipe may set: the chosen method's trl config."""
    return METHODS[method_of(raw)][0]


def key_problem(key: str, raw: dict) -> Optional[str]:
    """A recipe key that another method's trl config takes: name the methods that do."""
    from ..trainer_keys import trainer_fields

    takers = [m for m, (kind, _, _) in METHODS.items() if key in trainer_fields(kind)]
    if not takers:
        return None
    method = raw.get("preference_method", DEFAULT_METHOD)
    return f"{key}: preference_method {method} does not take it; it applies to {', '.join(takers)}"


def trainer_defaults(raw: dict) -> dict:
    """Trainer defaults that differ for this task: KTO's KL term pairs each completion with its batch neighbour's
    and needs dataset order. The other methods keep lora_ft's length grouping (by the `length` column, see
    _prepare_split): pairs vary from 30 to 500 tokens, and a batch pads both sequences to its longest."""
    return {"train_sampling_strategy": "sequential"} if method_of(raw) == "kto" else {}


def recipe_problems(args, trainer: dict) -> list[str]:
    p = only_for("sequence-classification", args, also=TOKEN_KEYS)
    m = args.preference_method
    if m not in METHODS:
        return p + [f"preference_method: '{m}' is not one of {', '.join(METHODS)}"]
    implied = METHODS[m][2]
    given = trainer.get("loss_type")
    if implied and given is not None and [given] != [implied] and given != [implied]:
        p.append(f"loss_type: preference_method {m} is loss_type {implied}; drop loss_type, or choose another method")
    if args.rpo_alpha is not None and m not in ("dpo", "ipo"):
        p.append(f"rpo_alpha: applies to preference_method dpo or ipo (an SFT term on chosen), not {m}")
    if args.rpo_alpha is not None and "loss_type" in trainer:
        p.append("rpo_alpha: adds the sft loss to loss_type; give either rpo_alpha or loss_type with loss_weights")
    if args.dataset_format not in FORMATS:
        p.append(f"dataset_format: '{args.dataset_format}' is not one of {', '.join(FORMATS)} for task preference")
    for key in ("max_prompt_length", "max_completion_length"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.append(f"{key}: must be at least 1, got {getattr(args, key)}")
    if m == "kto" and str(trainer.get("train_sampling_strategy", "sequential")) != "sequential":
        p.append("train_sampling_strategy: KTO's KL term needs sequential; drop the key")
    if m == "kto" and int(trainer.get("per_device_train_batch_size", 2)) < 2:
        p.append("per_device_train_batch_size: KTO estimates its KL term within a batch; use 2 or more")
    return p


def training_kwargs(args) -> dict:
    m = args.preference_method
    # remove_unused_columns off: the `length` column must reach the length-grouping sampler (trl's collators read
    # only the token columns they know)
    out: dict[str, Any] = {"max_length": args.max_length, "remove_unused_columns": False}
    implied = METHODS[m][2]
    if implied:
        out["loss_type"] = [implied] if METHODS[m][0] == "dpo" else implied
    if m == "simpo":
        out["cpo_alpha"] = 0.0  # pure SimPO: no behaviour-cloning term (trl's docs)
    if args.rpo_alpha is not None:  # RPO: trl 1.16 writes it as an added sft loss with its weight
        out["loss_type"] = [implied or "sigmoid", "sft"]
        out["loss_weights"] = [1.0, float(args.rpo_alpha)]
    if m in ("orpo", "simpo") and args.max_completion_length:
        out["max_completion_length"] = args.max_completion_length
    return out


# ---------------------------------------------------------------- data


@dataclass
class PreparedData:
    train: Any  # rows trl reads: prompt / chosen / rejected (or prompt / completion / label), messages or text
    eval: Any
    method: str = DEFAULT_METHOD
    eval_pairs: list = field(default_factory=list)  # lora_ft-encoded eval rows for the metrics
    eval_prompts: list = field(default_factory=list)  # (prompt, reference) for the logged generations
    notes: list = field(default_factory=list)
    dropped: dict = field(default_factory=dict)  # {"train_equal": n, ...}
    train_tokens: int = 0  # prompt + completion tokens of both sequences of every train pair
    max_new_tokens: int = 64
    fresh_adapter: bool = True
    start: Optional[list] = None  # the starting model's log-probs on eval_pairs (the reference's), from build_trainer
    generation_logger: Any = None  # causal_lm's eval-generation callback, when there are eval prompts


def detect_format(columns: list[str], requested: str) -> str:
    if requested != "auto":
        return requested
    if "chosen" in columns and "rejected" in columns:
        return "preference" if "prompt" in columns else "implicit-preference"
    if {"prompt", "completion", "label"} <= set(columns):
        return "unpaired"
    raise DataError(f"dataset_format: cannot tell the preference format from columns ({', '.join(columns)}); expected "
                    "prompt+chosen+rejected, chosen+rejected (implicit prompt) or prompt+completion+label (KTO); "
                    "use column_map")


REQUIRED = {"preference": ("prompt", "chosen", "rejected"), "implicit-preference": ("chosen", "rejected"),
            "unpaired": ("prompt", "completion", "label")}


def _text(x) -> str:
    return " ".join(m.get("content") or "" for m in x) if isinstance(x, list) else (x or "")


def _as_messages(x, role: str) -> list[dict]:
    return [dict(m) for m in x] if isinstance(x, list) else [{"role": role, "content": x}]


def _canonical(row: dict, fmt: str, chat: bool, system_prompt: Optional[str]) -> dict:
    """One row as trl reads it: messages (with the system prompt) under a chat template, else plain text."""
    # UltraFeedback-style rows repeat the prompt inside chosen/rejected next to a `prompt` column: the turns rule
    implicit = fmt == "implicit-preference" or (fmt == "preference" and isinstance(row["chosen"], list)
                                                and row["chosen"] and row["chosen"][0].get("role") != "assistant")
    if implicit:
        from trl.data_utils import extract_prompt

        row = {**row, **extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})}
    keys = ("completion",) if fmt == "unpaired" else ("chosen", "rejected")
    if not chat:
        if any(isinstance(row[k], list) for k in ("prompt",) + keys):
            raise DataError("preference data: conversational rows need a chat template; set chat_template in the recipe")
        out = {k: row[k] for k in ("prompt",) + keys}
    else:
        prompt = _as_messages(row["prompt"], "user")
        if system_prompt and prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}] + prompt
        out = {"prompt": prompt, **{k: _as_messages(row[k], "assistant") for k in keys}}
    if fmt == "unpaired":
        out["label"] = bool(row["label"])
    return out


def encode_pair(tok, row: dict, chat: bool) -> tuple[list, list]:
    """(prompt ids, completion ids) of a canonical row's completion(s), rendered as SFT trains and generation
    prompts: the completion ends with the end-of-turn (or EOS) token. Returns one completion list per side."""
    outs = []
    for key in ("completion",) if "completion" in row else ("chosen", "rejected"):
        if chat:
            enc = causal_lm.encode_chat(tok, row["prompt"] + row[key], max_length=1 << 30)
        else:
            enc = causal_lm.encode_plain(tok, row["prompt"], row[key], max_length=1 << 30)
        labels = enc["labels"]
        last = max(i for i, t in enumerate(labels) if t != -100)
        start = last
        while start > 0 and labels[start - 1] != -100:
            start -= 1
        outs.append((enc["input_ids"][:start], enc["input_ids"][start:last + 1]))
    return outs[0][0], [c for _, c in outs]


def _prepare_split(ds, tok, fmt: str, chat: bool, a, where: str, dropped: dict, notes: list):
    """Canonical rows for trl and encoded rows for the metrics; empty, equal and too-long pairs are dropped."""
    rows, encoded = [], []
    counts = {"empty": 0, "equal": 0, "too_long": 0}
    for raw in ds:
        if any(raw.get(c) is None for c in REQUIRED[fmt]):
            counts["empty"] += 1
            continue
        row = _canonical(raw, fmt, chat, a.system_prompt)
        sides = [row["completion"]] if fmt == "unpaired" else [row["chosen"], row["rejected"]]
        if not _text(row["prompt"]).strip() or any(not _text(s).strip() for s in sides):
            counts["empty"] += 1
            continue
        if len(sides) == 2 and _text(sides[0]).strip() == _text(sides[1]).strip():
            counts["equal"] += 1
            continue
        prompt_ids, completions = encode_pair(tok, row, chat)
        # Too long: a cut would drop a completion's end-of-turn token, and the model would learn not to stop.
        if (any(len(prompt_ids) + len(c) > a.max_length for c in completions)
                or (a.max_prompt_length and len(prompt_ids) > a.max_prompt_length)
                or (a.max_completion_length and any(len(c) > a.max_completion_length for c in completions))):
            counts["too_long"] += 1
            continue
        rows.append({**row, "length": len(prompt_ids) + max(map(len, completions))})
        encoded.append({"prompt_ids": prompt_ids, "completions": completions, "label": row.get("label")})
    for why, n in counts.items():
        dropped[f"{where}_{why}"] = n
        if n:
            limit = f" (max_length {a.max_length})" if why == "too_long" else ""
            notes.append(f"{where}: dropped {n} {why.replace('_', '-')} pair(s){limit}")
    if not rows:
        raise DataError(f"{where}: no preference pairs left after dropping empty, equal and too-long ones; raise "
                        "max_length or check the columns")
    return rows, encoded


def prepare_data(recipe, tok) -> PreparedData:
    from datasets import Dataset

    a = recipe.args
    seed = recipe.trainer.get("seed", 42)
    train, eval_ds, notes = load_task_train(a, seed, "train")
    fmt = detect_format(train.column_names, a.dataset_format)
    _require(train, fmt, "train")
    if fmt == "unpaired" and a.preference_method != "kto":
        raise DataError(f"dataset_format unpaired (prompt/completion/label): only preference_method kto learns from "
                        f"unpaired completions, not {a.preference_method}; use pairs (prompt/chosen/rejected) or kto")
    chat = causal_lm.uses_chat("preference", tok, a.use_chat_template)
    if chat:
        causal_lm._check_chat("prompt-completion", chat, tok)  # a template that cannot render an exchange stops here
    a.dataset_format, a.use_chat_template = fmt, chat  # the saved recipe records what was detected
    if a.eval_split and eval_ds is None:
        train, eval_ds = split_off_eval(train, a.eval_size, seed)
        notes.append(f"no '{a.eval_split}' split: held out {len(eval_ds)} train rows (eval_size={a.eval_size}, seed={seed})")
    elif eval_ds is not None:
        eval_ds = apply_column_map(eval_ds, a.column_map, "eval")
        _require(eval_ds, fmt, "eval")
    train = take(train, a.max_train_samples, seed)
    eval_ds = take(eval_ds, a.max_eval_samples, seed) if eval_ds is not None else None
    dropped: dict = {}
    train_rows, train_enc = _prepare_split(train, tok, fmt, chat, a, "train", dropped, notes)
    eval_rows, eval_enc = (_prepare_split(eval_ds, tok, fmt, chat, a, "eval", dropped, notes) if eval_ds is not None
                           else ([], []))
    tokens = sum(len(e["prompt_ids"]) * len(e["completions"]) + sum(map(len, e["completions"])) for e in train_enc)
    prompts = []
    for r in eval_rows[:causal_lm.N_LOGGED_GENERATIONS]:
        ref = _text(r.get("chosen", r.get("completion")))
        prompts.append((r["prompt"], ref))
    return PreparedData(Dataset.from_list(train_rows), Dataset.from_list(eval_rows) if eval_rows else None,
                        a.preference_method, eval_enc, prompts, notes, dropped, tokens, a.generation_max_new_tokens,
                        fresh_adapter=not a.adapter_name_or_path and a.init_lora_weights in (True, "gaussian"))


def _require(ds, fmt: str, where: str) -> None:
    missing = [c for c in REQUIRED[fmt] if c not in ds.column_names]
    if missing:
        raise DataError(f"dataset_format {fmt}: column(s) {', '.join(missing)} missing in {where} "
                        f"(columns: {', '.join(ds.column_names)}); use column_map")


def data_checks(tok, data, recipe) -> list:
    """Every completion ends with a stop token (EOS or the template's end-of-turn); the saved chat template renders
    prompts as training did."""
    from ..doctor import FAIL, PASS, Check, chat_template_check
    from ..inference import end_of_turn_id

    a = recipe.args
    stops = {t for t in (tok.eos_token_id, end_of_turn_id(tok) if a.use_chat_template else None) if t is not None}
    rows = data.eval_pairs or []
    sample = [c for e in _train_sample(tok, data, a) for c in e["completions"]] + [c for e in rows for c in e["completions"]]
    missing = sum(1 for c in sample if not c or c[-1] not in stops)
    names = ", ".join(repr(tok.convert_ids_to_tokens(t)) for t in sorted(stops)) or "none"
    out = [Check("eos in completions", FAIL if missing else PASS,
                 f"{len(sample) - missing}/{len(sample)} sampled completions end with a stop token ({names})"
                 + ("; generation would not stop: check eos_token / chat template" if missing else ""))]
    if a.use_chat_template:
        out.append(chat_template_check(tok, a))
    return out


def _train_sample(tok, data, a, n: int = 32) -> list:
    rows = data.train.select(range(min(n, len(data.train))))
    return [{"completions": encode_pair(tok, r, bool(a.use_chat_template))[1]} for r in rows]


# ---------------------------------------------------------------- training


def _trainer_class(method: str):
    import importlib
    import warnings

    module, name = METHODS[method][1].split(":")
    with warnings.catch_warnings():  # trl.experimental warns on import that its API may change: we pin trl
        warnings.simplefilter("ignore")
        return getattr(importlib.import_module(module), name)


def build_trainer(model, tok, training_args, data: PreparedData, callbacks):
    from .pair_scores import score_pairs

    model.config.use_cache = False
    if data.eval_prompts:  # also called by final_eval: merge verifies with these prompts, as for an SFT run
        data.generation_logger = causal_lm._generation_logger(tok, data.eval_prompts, data.max_new_tokens)
        callbacks = list(callbacks) + [data.generation_logger]
    trainer = lora_ft_trainer(_trainer_class(data.method))(
        model=model, args=training_args, train_dataset=data.train, eval_dataset=data.eval, processing_class=tok,
        callbacks=list(callbacks) + [_drop_reference_copy()])
    peft_model = trainer.model
    if data.method in ("dpo", "ipo", "kto") and not getattr(training_args, "use_weighting", False):
        # trl's CPU fallback scores every position (prompt and padding too) in fp32: measured 14.9 GB peak and most
        # of each step on SmolLM2 8 x 2 x 512; lora_ft's CPU head scores the completion tokens only (WPO weighting
        # needs a field it does not compute: trl's path then)
        cpu_lm_head.install(peft_model)
    if "ref" in getattr(peft_model, "peft_config", {}):
        if data.fresh_adapter:  # the adapter starts as the identity: disabling it gives the reference, no copy held
            peft_model.delete_adapter("ref")
            peft_model.set_adapter("default")
        for name, p in peft_model.named_parameters():
            if ".ref." in name:  # the frozen copy of a continued adapter (the SFT model as reference)
                p.requires_grad_(False)
    if data.eval_pairs:  # the starting model is the reference: its log-probs, once, before any step
        data.start = score_pairs(peft_model, tok, data.eval_pairs, training_args.per_device_eval_batch_size,
                                 bool(training_args.bf16))
    return trainer


def _drop_reference_copy():
    from transformers import TrainerCallback

    class DropReference(TrainerCallback):
        """A continued adapter's frozen "ref" copy is training machinery: the run dir holds one adapter."""

        def on_train_end(self, args, state, control, model=None, **kw):
            if model is not None and "ref" in getattr(model, "peft_config", {}):
                model.delete_adapter("ref")
                model.set_adapter("default")

    return DropReference()


def final_eval(trainer, data: PreparedData, run_dir: Path) -> dict:
    from .pair_scores import pair_metrics, score_pairs
    from ..plots import plot_preference_curves

    args = trainer.args
    step = trainer.state.global_step
    evaluated = any(h.get("step") == step and "eval_loss" in h for h in trainer.state.log_history)
    if data.generation_logger is not None and not evaluated:  # the last step's samples, unless its eval logged them
        data.generation_logger.on_evaluate(args, trainer.state, trainer.control, model=trainer.model)
    now = score_pairs(trainer.model, trainer.processing_class, data.eval_pairs, args.per_device_eval_batch_size,
                      bool(args.bf16))
    beta = float(args.beta)
    ref_free = data.method in REFERENCE_FREE
    out = {f"eval_{k}": v for k, v in pair_metrics(now, data.start, beta, ref_free).items()}
    out.update({f"eval_{k}_before": v for k, v in pair_metrics(data.start, data.start, beta, ref_free).items()
                if k.startswith("logp") or (ref_free and k.startswith("reward"))})
    out["eval_samples"] = len(data.eval_pairs)
    out["preference_method"] = data.method
    out["beta"] = beta
    out["dropped_pairs"] = dict(data.dropped)
    plot_preference_curves(trainer.state.log_history, run_dir / "preference_curves.png")
    return out


def evaluate_run(model, tok, recipe, split: Optional[str] = None) -> dict:
    """`lora-ft eval` of a preference run: the metrics of final_eval on a split, the reference being the base (the
    adapter disabled) or, for a continued adapter, the base model the run started from."""
    from .pair_scores import pair_metrics, score_pairs

    a = recipe.args
    split = split or a.eval_split or "test"
    ds = apply_column_map(load_eval_split(a.dataset_name, split, a.dataset_config), a.column_map, split)
    _require(ds, a.dataset_format, split)
    ds = take(ds, a.max_eval_samples, recipe.trainer.get("seed", 42))
    _, enc = _prepare_split(ds, tok, a.dataset_format, bool(a.use_chat_template), a, split, {}, [])
    bs = int(recipe.trainer.get("per_device_eval_batch_size", 8))
    now = score_pairs(model, tok, enc, bs, False)
    with model.disable_adapter():
        ref = score_pairs(model, tok, enc, bs, False)
    beta = float(recipe.trainer.get("beta", 0.1))
    out = {f"eval_{k}": v for k, v in pair_metrics(now, ref, beta, a.preference_method in REFERENCE_FREE).items()}
    return {**out, "eval_samples": len(enc), "dataset": a.dataset_name, "split": split,
            "reference": "base model (adapter disabled)"}


def card_lines(recipe: dict) -> list[str]:
    method = recipe.get("preference_method") or DEFAULT_METHOD
    return [f"- **Preference tuning:** {method} (trl {METHODS[method][1].split(':')[1]}), beta {recipe.get('beta', 0.1)}"]


