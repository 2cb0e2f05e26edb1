"""The recipe schema: one flat YAML, keys named as transformers/trl/peft name them.

A recipe is parsed once (YAML + `--key value` overrides), every problem is collected and reported at
once, and the resolved result is what gets saved in the run dir. Nothing here imports torch or
transformers at module import, so `lora-ft --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import RecipeError
from .recipe_checks import ineffective_keys, settle_strategies, value_problems
from .tasks import DEFAULT_TASK, TASKS, key_problem, trainer_defaults, trainer_kind
RECIPE_FILE = "lora_ft_recipe.yaml"


def _f(default, help_text: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help_text, **kw})
    return field(default=default, metadata={"help": help_text, **kw})


@dataclass
class LoraFtArguments:
    """Keys lora_ft adds on top of the trainer's arguments. Each default lives here and only here."""

    # --- model
    model_name_or_path: Optional[str] = _f(None, "Hub id, local folder, or builtin:NAME (see `lora-ft models list`)")
    task: str = _f(DEFAULT_TASK, "one of " + ", ".join(TASKS))
    trust_remote_code: bool = _f(False, "run modelling code shipped with the model (off: it executes foreign code)")
    allow_pickle: bool = _f(False, "accept pickled .bin weights; safetensors only otherwise")
    dtype: str = _f("float32", "weight dtype at load: float32 keeps fp32 master weights under bf16 autocast")
    attn_implementation: Optional[str] = _f(None, "eager, sdpa, flash_attention_2; None lets transformers pick")
    adapter_name_or_path: Optional[str] = _f(None, "a lora_ft run dir or peft adapter to continue training")
    # --- data
    dataset_name: Optional[str] = _f(None, "Hub dataset id, a local folder of split files, or one CSV/JSON/JSONL/Parquet file")
    dataset_config: Optional[str] = _f(None, "Hub dataset configuration name")
    train_split: str = _f("train", "split to train on")
    eval_split: Optional[str] = _f("test", "split to evaluate on; 'none' trains without eval; missing -> seeded split")
    eval_size: float = _f(0.1, "fraction of train held out when the data has no eval split")
    text_column: str = _f("text", "column holding the input text")
    text_pair_column: Optional[str] = _f(None, "second text column for pair classification")
    label_column: str = _f("label", "column holding the label (string or int)")
    labels: Optional[list] = _f(None, "label names in id order; default: sorted labels found in train")
    max_length: int = _f(512, "tokens per example; longer inputs are truncated")
    # --- token-classification (issue 19)
    tokens_column: str = _f("tokens", "token-classification: column holding each sentence's words (a list)")
    tags_column: str = _f("ner_tags", "token-classification: column holding one tag per word (strings, or ids into labels)")
    tag_scheme: str = _f("auto", "token-classification: auto, IOB1, IOB2 or BIOES; tags are converted to IOB2 for training")
    label_all_tokens: bool = _f(False, "token-classification: label every subword of a word (false: the first; the rest -100)")
    max_train_samples: Optional[int] = _f(None, "cap on training rows (seeded shuffle first)")
    max_eval_samples: Optional[int] = _f(None, "cap on eval rows (seeded shuffle first)")
    # --- causal-lm / seq2seq (issue 3)
    dataset_format: str = _f("auto", "auto, text, prompt-completion, instruction, messages")
    column_map: dict = _f({}, "rename columns before use, e.g. {instruction: prompt}")
    chat_template: Optional[str] = _f(None, "Jinja chat template; default: the tokenizer's own")
    system_prompt: Optional[str] = _f(None, "system turn added to every chat example (and at generation)")
    use_chat_template: Optional[bool] = _f(None, "format turns with the chat template; default: yes when the data has turns and the tokenizer a template")
    source_template: Optional[str] = _f(None, "model input built from columns: seq2seq 'question: {question} context: {context}'; classification 'Tweet: {text}\\nSentiment:'")
    target_column: Optional[str] = _f(None, "seq2seq target column; SQuAD-style `answers` works directly")
    max_target_length: int = _f(64, "seq2seq target tokens")
    generation_max_new_tokens: int = _f(64, "tokens generated at eval for seq2seq and logged samples")
    # --- preference (issue 20); the trl keys (beta, loss_type, ...) are the chosen method's trl config's
    preference_method: str = _f("dpo", "preference: dpo, ipo, orpo, simpo or kto (trl's trainers)")
    max_prompt_length: Optional[int] = _f(None, "preference: pairs whose rendered prompt is longer are dropped (counted)")
    max_completion_length: Optional[int] = _f(None, "preference: pairs with a longer completion are dropped (counted)")
    rpo_alpha: Optional[float] = _f(None, "preference dpo/ipo: weight of an SFT loss on chosen (RPO); trl 1.16: loss_type + [sft]")
    # --- peft
    use_peft: bool = _f(True, "train LoRA adapters; false trains all weights (for comparison)")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA scaling numerator (alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input (0: on CPU the random mask costs ~40% of a DoRA step)")
    lora_target_modules: Optional[Union[str, list]] = _f(None, "module names, or 'all-linear' (default: all linear but the head)")
    lora_modules_to_save: Optional[list] = _f(None, "modules trained fully and saved; the classifier head is added automatically")
    use_dora: bool = _f(False, "weight-decomposed LoRA")
    clean_lowercase: bool = _f(False, "classification: lowercase texts (training, eval and serving alike)")
    clean_urls: bool = _f(False, "classification: remove URLs from texts")
    clean_mentions: bool = _f(False, "classification: remove @mentions from texts")
    clean_whitespace: bool = _f(False, "classification: collapse runs of whitespace")
    drop_duplicates: bool = _f(False, "classification: drop repeated train rows (same text and label)")
    drop_eval_leaks: bool = _f(False, "classification: drop train rows whose text is also in the eval split")
    augment: Optional[str] = _f(None, "classification, train split only: EDA ops with rates, e.g. 'synonym:0.1,swap:0.1,delete:0.1,insert:0.1'")
    augment_copies: int = _f(1, "augmented variants added per train row")
    dataset_mixture: Optional[list] = _f(None, "several train sources: [{dataset_name, split, samples or fraction, column_map}]")
    search_space: Optional[str] = _f(None, "lora-ft search's default space, e.g. 'learning_rate=loguniform(1e-4,3e-3) lora_r=choice(8,16,32)'")
    head_init: str = _f("random", "classifier head start: random, or label_words (decoder LMs: each label's row = the LM-head row of the label's first token; pair with source_template)")
    use_rslora: bool = _f(False, "rank-stabilised scaling alpha / sqrt(r)")
    init_lora_weights: Union[bool, str] = _f(True, "true, gaussian, pissa, olora, loftq ...")
    # --- quantization (bitsandbytes)
    load_in_4bit: bool = _f(False, "QLoRA: 4-bit base weights")
    load_in_8bit: bool = _f(False, "8-bit base weights")
    bnb_4bit_quant_type: str = _f("nf4", "nf4 or fp4")
    bnb_4bit_compute_dtype: str = _f("bfloat16", "dtype of 4-bit matmuls: bfloat16, float16, float32")
    use_bnb_nested_quant: bool = _f(False, "double quantization of the 4-bit constants")


# Trainer arguments whose transformers default does not suit a fine-tuning toolkit. One home.
TRAINER_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-4,  # LoRA wants ~10x the full fine-tuning rate
    "num_train_epochs": 1,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "warmup_steps": 0.05,  # a float below 1 is a fraction of total steps in transformers 5
    "logging_steps": 10,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 1,
    "report_to": ["tensorboard"],
    "train_sampling_strategy": "group_by_length",  # similar lengths per batch: less padding
    "seed": 42,
    "disable_tqdm": False,
    "gradient_checkpointing": False,  # trl turns it on; a LoRA step on a small model is ~30% faster without
    "predict_with_generate": True,  # seq2seq only: eval metrics (EM/F1/ROUGE) need generated text
}
# Keys whose value is decided from the machine when the recipe leaves them out (see resolve_hardware).
AUTO_KEYS = ("bf16", "use_cpu")

OUR_FIELDS = {f.name: f for f in dataclasses.fields(LoraFtArguments)}
OUR_TYPES = typing.get_type_hints(LoraFtArguments)


def trainer_args_class(task: str, raw: Optional[dict] = None):
    """The trainer-arguments class whose fields a recipe for `task` (keys `raw`) may also set (imports transformers)."""
    from .trainer_keys import import_class

    return import_class(trainer_kind(task, raw))


# Keys that exist in the trainer class too but lora_ft owns: ours wins, and we pass it on where it applies.
SHARED_KEYS = {"max_length", "trust_remote_code", "max_completion_length"}


@dataclass
class Recipe:
    """A resolved recipe: lora_ft's own keys plus the trainer arguments the user (or our defaults) set."""

    args: LoraFtArguments
    trainer: dict[str, Any]
    source: Optional[str] = None
    notes: list = field(default_factory=list)  # warnings: keys the rest of the recipe makes inert (recipe_checks)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self.args)
        out.update(self.trainer)
        return out

    def __getattr__(self, name):  # recipe.learning_rate etc. read from whichever half holds it
        if name in ("args", "trainer", "source", "notes"):
            raise AttributeError(name)
        if name in OUR_FIELDS:
            return getattr(self.args, name)
        if name in self.trainer:
            return self.trainer[name]
        raise AttributeError(name)


# ---------------------------------------------------------------- parsing


class CliText(str):
    """A raw command-line value. `--eval_strategy no` must stay "no", not become YAML's False."""


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--key value` / `--key=value` pairs -> dict. Values are read as YAML scalars (true, 3, [a, b])."""
    out: dict[str, Any] = {}
    problems = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            problems.append(f"override '{tok}': expected --key value")
            i += 1
            continue
        key = tok[2:].replace("-", "_")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            raw = argv[i + 1]
            i += 2
        else:
            raw = "true"  # a bare flag: --use_dora
            i += 1
        out[key] = CliText(raw)  # typed later against the key's annotation, so text keys keep their text
    if problems:
        raise RecipeError(problems)
    return out


def read_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise RecipeError([f"recipe {path}: file not found; pass the path to a YAML recipe (see recipes/)"])
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError([f"recipe {path}: not UTF-8 text; save it as UTF-8"]) from None
    except OSError as e:
        raise RecipeError([f"recipe {path}: cannot read ({e.strerror}); check permissions"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError([f"recipe {path}:{where} is not valid YAML ({getattr(e, 'problem', e)}); fix the syntax"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"recipe {path}: top level must be a mapping of key: value, got {type(data).__name__}"])
    return data


def load_recipe(path: Optional[str], overrides: list[str] | dict | None = None, *, check_trainer: bool = True) -> Recipe:
    raw = read_recipe_file(path) if path else {}
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides or [])
    raw.update(extra)
    return resolve(raw, source=str(path) if path else None, check_trainer=check_trainer)


def resolve(raw: dict[str, Any], source: Optional[str] = None, *, check_trainer: bool = True) -> Recipe:
    """Validate every key of `raw` and return a Recipe, or raise RecipeError listing every problem."""
    problems: list[str] = []
    ours: dict[str, Any] = {}
    theirs: dict[str, Any] = {}
    task = raw.get("task", OUR_FIELDS["task"].default)
    if task not in TASKS:
        problems.append(f"task: '{task}' is not one of {', '.join(TASKS)}")
        task = DEFAULT_TASK
    trainer_fields = _trainer_fields(task, raw) if check_trainer else {}
    for key, value in raw.items():
        if not isinstance(key, str):
            problems.append(f"key {key!r}: recipe keys must be strings")
        elif key in OUR_FIELDS:
            ok, val, why = coerce(value, OUR_TYPES[key])
            if ok:
                ours[key] = val
            else:
                problems.append(f"{key}: {why}")
        elif key in trainer_fields:
            ok, val, why = coerce(value, trainer_fields[key])
            if ok:
                theirs[key] = val
            else:
                problems.append(f"{key}: {why}")
        else:
            other = key_problem(task, key, raw) if check_trainer else None
            if other:
                problems.append(other)
                continue
            known = list(OUR_FIELDS) + list(trainer_fields)
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
            hint = f"; did you mean '{close[0]}'?" if close else "; see `lora-ft train --help-keys`"
            problems.append(f"{key}: unknown recipe key{hint}")
    args = LoraFtArguments(**ours)
    defaults = {**TRAINER_DEFAULTS, **trainer_defaults(task, raw)}
    trainer = {**{k: v for k, v in defaults.items() if k in trainer_fields or not check_trainer}, **theirs}
    if "output_dir" not in trainer:
        stem = Path(source).stem if source else "run"
        trainer["output_dir"] = str(Path("runs") / stem)
    if args.eval_split is None or str(args.eval_split).lower() == "none":
        args.eval_split = None
        if "eval_strategy" not in theirs:
            trainer["eval_strategy"] = "no"
        if "save_strategy" not in theirs and "load_best_model_at_end" not in theirs:
            trainer.setdefault("save_strategy", "epoch")
    notes = settle_strategies(theirs, trainer, args)
    problems += value_problems(args, trainer)
    if problems:
        raise RecipeError(problems)
    notes += ineffective_keys(args, trainer, {k: f.default for k, f in OUR_FIELDS.items()})
    return Recipe(args=args, trainer=trainer, source=source, notes=notes)


def _trainer_fields(task: str, raw: Optional[dict] = None) -> dict[str, Any]:
    from .trainer_keys import trainer_fields  # a snapshot: no transformers import, so mistakes are reported in ~1 s

    return {k: tp for k, tp in trainer_fields(trainer_kind(task, raw)).items() if k not in SHARED_KEYS}


# ---------------------------------------------------------------- types


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce_cli(raw: CliText, tp) -> tuple[bool, Any, str]:
    members = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    if [m for m in members if m is not type(None)] == [str]:
        return True, str(raw), ""
    try:
        parsed = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        parsed = str(raw)
    ok, val, why = coerce(parsed, tp)
    if not ok and str in members:
        return True, str(raw), ""
    return ok, val, why


def coerce(value, tp) -> tuple[bool, Any, str]:
    """Check `value` against annotation `tp`, converting strings from YAML/CLI where that is unambiguous."""
    if isinstance(value, CliText):
        return _coerce_cli(value, tp)
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value, ""
    if origin in (Union, types.UnionType):
        members = typing.get_args(tp)
        if value is None:
            return (type(None) in members), None, "may not be empty"
        # bool before int/float/str so "true" is a bool where a bool is allowed.
        # A single word stays a string where a string is allowed ("all-linear"); "a,b" may become a list.
        one_word = isinstance(value, str) and "," not in value
        order = sorted(members, key=lambda m: {bool: 0, int: 1, float: 2, str: 3 if one_word else 9}.get(m, 5))
        for m in order:
            if m is type(None):
                continue
            ok, val, _ = coerce(value, m)
            if ok:
                return True, val, ""
        return False, value, f"expected {' or '.join(_type_name(m) for m in members if m is not type(None))}, got {value!r}"
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        return (value in choices), value, f"expected one of {choices}, got {value!r}"
    if value is None:
        return False, value, "may not be empty"
    if tp is bool:
        if isinstance(value, bool):
            return True, value, ""
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return True, value.lower() in ("true", "yes"), ""
        return False, value, f"expected true or false, got {value!r}"
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value, ""
        if isinstance(value, float) and value.is_integer():
            return True, int(value), ""
        if isinstance(value, str):
            try:
                return True, int(value), ""
            except ValueError:
                pass
        return False, value, f"expected an integer, got {value!r}"
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value), ""
        if isinstance(value, str):
            try:
                return True, float(value), ""  # YAML reads 3e-4 as a string
            except ValueError:
                pass
        return False, value, f"expected a number, got {value!r}"
    if tp is str:
        if isinstance(value, str):
            return True, value, ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value), ""
        return False, value, f"expected a string, got {value!r}"
    if tp is list or origin is list:
        if isinstance(value, list):
            return True, value, ""
        if isinstance(value, str):
            return True, [v.strip() for v in value.split(",") if v.strip()], ""
        return False, value, f"expected a list, got {value!r}"
    if tp is dict or origin is dict:
        return isinstance(value, dict), value, f"expected a mapping, got {value!r}"
    if isinstance(tp, type) and issubclass(tp, __import__("enum").Enum):
        vals = [e.value for e in tp]
        if value is False and "no" in vals:  # YAML 1.1 reads `save_strategy: no` as false
            return True, "no", ""
        return (value in vals or value in list(tp)), value, f"expected one of {vals}, got {value!r}"
    return True, value, ""  # exotic trainer types: the trainer's own __post_init__ validates them


# ---------------------------------------------------------------- save / load


def save_recipe(recipe: Recipe, run_dir: str | os.PathLike) -> Path:
    from .security import redact

    path = Path(run_dir) / RECIPE_FILE
    body = yaml.safe_dump(redact(recipe.to_dict()), sort_keys=False)
    path.write_text(f"# resolved by lora_ft from {recipe.source or 'overrides'}\n{body}", encoding="utf-8")
    return path


def load_run_recipe(run_dir: str | os.PathLike) -> Recipe:
    from .errors import RunDirError

    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no {RECIPE_FILE}; pass a run dir written by `lora-ft train`")
    return resolve(read_recipe_file(path), source=str(path))
