"""Checks on a recipe's values, made while it is parsed: before torch or transformers load, before any weights load,
and before anything is written to output_dir.

Three kinds:
- problems: values or combinations that transformers, trl, torch or lora_ft would refuse later (often only after
  the model loaded, or as a traceback deep in a DataLoader), each one line naming the key;
- strategies: `save_steps`, `eval_steps` or `logging_steps` given without its strategy switch that strategy to
  `steps`, as transformers' own default strategy would; transformers otherwise ignores the value silently;
- notes: keys that have no effect under the rest of the recipe, as one warning line naming both keys.
"""

from __future__ import annotations

from typing import Any

from .errors import RecipeError

# trainer keys: the smallest value each may take (None-valued optional keys are not checked)
AT_LEAST_ONE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "eval_accumulation_steps", "save_total_limit", "generation_num_beams")
NON_NEGATIVE = ("num_train_epochs", "warmup_steps", "weight_decay", "max_grad_norm", "dataloader_num_workers", "seed",
                "data_seed")
POSITIVE = ("learning_rate", "adam_epsilon")
FRACTIONS = ("adam_beta1", "adam_beta2", "label_smoothing_factor")  # in [0, 1)
STEP_KEYS = {"save_steps": "save_strategy", "eval_steps": "eval_strategy", "logging_steps": "logging_strategy"}
SEED_LIMIT = 2**32  # numpy's seeds, which transformers' set_seed also sets

# lora_ft keys that act only under another key's setting: key -> (the key it needs, its value that disables it)
NEEDS = {
    **{k: ("use_peft", False) for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                                       "lora_modules_to_save", "use_dora", "use_rslora", "init_lora_weights")},
    **{k: ("load_in_4bit", False) for k in ("bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "use_bnb_nested_quant")},
    "augment_copies": ("augment", None),
    "max_eval_samples": ("eval_split", None),
}


def value_problems(args, trainer: dict[str, Any]) -> list[str]:
    """Every value or combination of the resolved recipe that would fail later, one line each."""
    return _our_problems(args, trainer) + _trainer_problems(args, trainer)


def _our_problems(args, trainer: dict[str, Any]) -> list[str]:
    p = []
    if not args.model_name_or_path:
        p.append("model_name_or_path: required; a Hub id, a local folder or builtin:NAME")
    if not args.dataset_name and not args.dataset_mixture:
        p.append("dataset_name: required; a Hub dataset id or a local file/folder (or a dataset_mixture)")
    if args.load_in_4bit and args.load_in_8bit:
        p.append("load_in_4bit, load_in_8bit: choose one")
    if (args.load_in_4bit or args.load_in_8bit) and not args.use_peft:
        p.append("use_peft: false with a quantized base cannot train; set use_peft: true or drop load_in_4bit/8bit")
    if args.bnb_4bit_quant_type not in ("nf4", "fp4"):
        p.append(f"bnb_4bit_quant_type: '{args.bnb_4bit_quant_type}' is not nf4 or fp4")
    for key in ("dtype", "bnb_4bit_compute_dtype"):
        if getattr(args, key) not in ("float32", "bfloat16", "float16", "auto"):
            p.append(f"{key}: '{getattr(args, key)}' is not one of float32, bfloat16, float16, auto")
    for key in ("lora_r", "lora_alpha", "max_length", "max_target_length", "generation_max_new_tokens"):
        if getattr(args, key) <= 0:
            p.append(f"{key}: must be at least 1, got {getattr(args, key)}")
    for key in ("max_train_samples", "max_eval_samples"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            p.append(f"{key}: must be at least 1, got {getattr(args, key)}")
    if not 0.0 <= args.lora_dropout < 1.0:
        p.append(f"lora_dropout: must be in [0, 1), got {args.lora_dropout}")
    if not 0.0 < args.eval_size < 1.0:
        p.append(f"eval_size: must be in (0, 1), got {args.eval_size}")
    if args.labels is not None and len(set(map(str, args.labels))) != len(args.labels):
        p.append("labels: contains duplicates; list each label once")
    if args.labels is not None and len(args.labels) < 2:
        p.append("labels: a classifier needs at least 2 labels")
    if args.augment:
        from .textprep import parse_augment

        try:
            parse_augment(args.augment)
        except RecipeError as e:
            p += e.problems
    if args.augment_copies < 1:
        p.append(f"augment_copies: must be at least 1, got {args.augment_copies}")
    if args.dataset_mixture is not None:
        from .data import mixture_problems

        p += mixture_problems(args.dataset_mixture)
    if args.head_init not in ("random", "label_words"):
        p.append(f"head_init: '{args.head_init}' is not one of random, label_words")
    from .tasks import TASKS, get_task

    if args.task in TASKS:  # an unknown task is reported by config.resolve
        p += get_task(args.task).recipe_problems(args, trainer)
    return p


def _trainer_problems(args, t: dict[str, Any]) -> list[str]:
    p = []

    def number(key):
        v = t.get(key)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    for key in AT_LEAST_ONE:
        if number(key) is not None and number(key) < 1:
            p.append(f"{key}: must be at least 1, got {t[key]}")
    for key in NON_NEGATIVE:
        if number(key) is not None and number(key) < 0:
            p.append(f"{key}: must be 0 or more, got {t[key]}")
    for key in POSITIVE:
        if number(key) is not None and not number(key) > 0:
            p.append(f"{key}: must be positive, got {t[key]}")
    for key in FRACTIONS:
        if number(key) is not None and not 0 <= number(key) < 1:
            p.append(f"{key}: must be in [0, 1), got {t[key]}")
    for key in ("seed", "data_seed"):
        if number(key) is not None and number(key) >= SEED_LIMIT:
            p.append(f"{key}: must be below 2**32, got {t[key]}")
    for key in STEP_KEYS:
        v = number(key)
        if v is not None and not v > 0:
            p.append(f"{key}: must be positive (a float below 1 is a fraction of the run's steps), got {t[key]}")
        elif v is not None and v > 1 and not float(v).is_integer():
            p.append(f"{key}: above 1 it counts steps and must be a whole number, got {t[key]}")
    max_steps = number("max_steps")
    if max_steps is not None and (max_steps == 0 or max_steps < -1):
        p.append(f"max_steps: must be positive, or -1 to train num_train_epochs, got {t['max_steps']}")
    epochs = number("num_train_epochs")
    if epochs == 0 and (max_steps is None or max_steps <= 0):
        p.append("num_train_epochs: 0 trains nothing; set it above 0, or set max_steps")
    if t.get("bf16") and t.get("fp16"):
        p.append("bf16, fp16: choose one")
    if args.eval_split is None and str(t.get("eval_strategy", "no")) != "no":
        p.append(f"eval_strategy: '{t['eval_strategy']}' needs an eval split; set eval_split, or eval_strategy: no")
    if t.get("load_best_model_at_end"):
        ev, sv = str(t.get("eval_strategy", "no")), str(t.get("save_strategy", "steps"))
        if ev == "no":
            p.append("load_best_model_at_end: needs evaluation; set eval_strategy: steps or epoch")
        elif sv != "best" and ev != sv:
            p.append(f"load_best_model_at_end: needs save_strategy equal to eval_strategy, got save_strategy: {sv}, "
                     f"eval_strategy: {ev}")
        elif ev == sv == "steps":
            # transformers takes a missing eval_steps from logging_steps
            every = number("eval_steps") or number("logging_steps")
            if number("save_steps") and every and number("save_steps") >= 1 and number("save_steps") % every:
                p.append(f"load_best_model_at_end: save_steps ({t['save_steps']}) must be a multiple of eval_steps "
                         f"({every}{'' if number('eval_steps') else ', from logging_steps'})")
    return p


def settle_strategies(given: dict[str, Any], trainer: dict[str, Any], args) -> list[str]:
    """`save_steps` (eval_steps, logging_steps) given without its strategy: that strategy becomes `steps`, in place
    in `trainer`. Returns warnings for step counts their strategy ignores."""
    notes = []
    for steps, strategy in STEP_KEYS.items():
        if steps not in given:
            continue
        if strategy not in given and not (strategy == "eval_strategy" and args.eval_split is None):
            if str(trainer.get(strategy, "steps")) != "steps":  # absent: transformers' own default, steps
                trainer[strategy] = "steps"
        elif str(trainer.get(strategy)) != "steps":
            why = "eval_split: none" if strategy == "eval_strategy" and args.eval_split is None else f"{strategy}: {trainer.get(strategy)}"
            notes.append(f"{steps}: has no effect with {why}; set {strategy}: steps")
    return notes


def ineffective_keys(args, trainer: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """Keys set away from their default that the rest of the recipe makes inert (a saved recipe lists every key, so
    only a value other than the default can have been meant)."""
    notes = []
    for key, (needs, off) in NEEDS.items():
        if getattr(args, needs) == off and getattr(args, key) != defaults[key]:
            notes.append(f"{key}: has no effect with {needs}: {'none' if off is None else str(off).lower()}")
    max_steps = trainer.get("max_steps")
    epochs = trainer.get("num_train_epochs")
    if isinstance(max_steps, int) and max_steps > 0 and epochs not in (None, 1, 1.0) and not isinstance(epochs, bool):
        notes.append(f"num_train_epochs: has no effect with max_steps: {max_steps} (max_steps wins)")
    return notes
