"""One training run, top to bottom: recipe -> data -> model -> trainer -> run dir with metrics and plots."""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path

from .config import Recipe, save_recipe, trainer_args_class
from .doctor import WARN, blocking, static_checks
from .errors import LoraFtError, RecipeError, RunDirError, TrainingInterrupted
from .hardware import cuda_available, fill_bf16, peak_memory_mb, reset_peak_memory
from .modeling import (
    attach_peft,
    count_parameters,
    load_model,
    load_tokenizer,
    new_top_modules,
)
from .runs import METRICS_FILE, STAGE, check_output_dir, clear_live_files, replace_final_files, stage_live_files, write_json
from .tasks import auto_class, get_task
from .trainers import CHECKPOINT_STAGE, RESUME_FILE, restore_checkpoints, save_model_gathered, stop_callbacks


def resolve_hardware(recipe: Recipe) -> None:
    """Fill the machine-dependent keys the recipe left out: bf16 where the hardware has it, CPU when no GPU."""
    t = recipe.trainer
    fill_bf16(t)
    if "use_cpu" not in t:
        t["use_cpu"] = not cuda_available()


def build_training_args(recipe: Recipe):
    cls = trainer_args_class(recipe.args.task, recipe.to_dict())
    kwargs = dict(recipe.trainer)
    for k, v in get_task(recipe.args.task).training_kwargs(recipe.args).items():
        kwargs.setdefault(k, v)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise RecipeError([f"trainer arguments: {str(e).strip().splitlines()[0]}"]) from None


def log(trainer_args, msg: str) -> None:
    if trainer_args.process_index == 0:
        print(f"[lora_ft] {msg}", flush=True)


def preflight(recipe: Recipe, targs) -> None:
    """`lora-ft doctor`'s model checks before any weights load: failures stop the run, warnings are printed."""
    checks, _ = static_checks(recipe)
    _stop_on_failures(checks, targs)


def _stop_on_failures(checks, targs) -> None:
    for c in checks:
        if c.status == WARN and not c.fixed and targs.process_index == 0:
            print(f"[lora_ft] warning: {c.name}: {c.detail}", file=sys.stderr, flush=True)
    failed = blocking(checks)
    if failed:
        raise LoraFtError(f"{failed[0].name}: {failed[0].detail} (`lora-ft doctor RECIPE` lists every check)")


def train(recipe: Recipe, callbacks: list | None = None, overwrite: bool = False) -> Path:
    """callbacks: extra transformers TrainerCallbacks (the hyperparameter search reports and prunes through one).
    overwrite: replace a run of another recipe in output_dir (else refused)."""
    a = recipe.args
    task = get_task(a.task)
    run_dir = Path(recipe.trainer["output_dir"])
    resolve_hardware(recipe)  # first: the saved recipe it is compared with holds the resolved bf16/use_cpu
    check_output_dir(run_dir, recipe, overwrite)
    restore_checkpoints(run_dir)
    from .cpu import fsdp as cpu_fsdp

    if cpu_fsdp.wanted():
        cpu_fsdp.install()
    targs = build_training_args(recipe)
    from transformers import set_seed

    set_seed(targs.seed)  # before the model loads: a fresh head's init must be reproducible too

    preflight(recipe, targs)
    tokenizer = load_tokenizer(a)
    data = task.prepare_data(recipe, tokenizer)
    for note in data.notes:
        log(targs, note)
    _stop_on_failures(task.data_checks(tokenizer, data, recipe), targs)
    if hasattr(data, "label_names"):
        a.labels = data.label_names  # the saved recipe records label order: ids mean the same at serving time

    model, new_params = load_model(a, auto_class(task), **task.model_kwargs(data))
    task.setup_model(model, tokenizer)
    if a.head_init == "label_words" and not a.adapter_name_or_path:
        task.init_head_from_label_words(model, tokenizer, a.labels, a.model_name_or_path)
    modules_to_save = sorted(set(a.lora_modules_to_save or []) | set(new_top_modules(model, new_params)))
    model = attach_peft(model, a, task.PEFT_TASK_TYPE, modules_to_save, targs.gradient_checkpointing,
                        mixed_precision=targs.bf16 or targs.fp16)
    trainable, total = count_parameters(model)
    world = targs.world_size
    per_step = targs.per_device_train_batch_size * targs.gradient_accumulation_steps * world
    steps = math.ceil(len(data.train) / per_step) * math.ceil(targs.num_train_epochs) if targs.max_steps <= 0 else targs.max_steps
    log(targs, f"model {a.model_name_or_path}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
        + (f"; fully trained: {', '.join(modules_to_save)}" if modules_to_save and a.use_peft else ""))
    log(targs, f"{len(data.train)} train / {len(data.eval) if data.eval is not None else 0} eval examples; "
        f"{per_step} examples per step ({targs.per_device_train_batch_size} x {targs.gradient_accumulation_steps} accum x {world} proc); "
        f"~{steps} steps; bf16={targs.bf16} device={targs.device}")

    try:
        trainer = task.build_trainer(model, tokenizer, targs, data, callbacks=list(callbacks or []))
    except ValueError as e:  # transformers / trl refuse a combination of recipe keys: say which, in one line
        msg = " ".join(str(e).split())
        raise LoraFtError(f"recipe: the trainer refused these settings: {msg}") from None
    check_engine(trainer)
    reset_peak_memory()
    started = time.time()
    trainer.resume_info = resume_info(recipe, data)
    trainer.add_callback(stop_callbacks(trainer))
    resume = _resume_arg(recipe, run_dir)
    if resume:
        check_resume(Path(resume) if resume is not True else last_checkpoint(run_dir), trainer.resume_info)
    elif trainer.is_world_process_zero():
        clear_live_files(run_dir)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except OSError as e:  # a checkpoint write that failed (full disk): the staged half is dropped, the last whole one kept
        if trainer.is_world_process_zero():
            shutil.rmtree(run_dir / CHECKPOINT_STAGE, ignore_errors=True)
        last = last_checkpoint(run_dir)
        raise LoraFtError(f"output_dir {run_dir}: writing failed during training ({e.strerror or e}); free disk space and rerun "
                          + ("with --resume_from_checkpoint true (last whole checkpoint: " + Path(last).name + ")" if last else "")) from None
    runtime = time.time() - started
    if trainer.nan_step is not None:
        last = last_checkpoint(run_dir)
        raise LoraFtError(f"loss became NaN/inf by step {trainer.nan_step}; stopped without saving it"
                          + (f"; last good checkpoint: {last}" if last else "") + ". Lower learning_rate, or check the data")
    if trainer.interrupted:
        raise TrainingInterrupted(f"interrupted at step {trainer.state.global_step}; checkpoint saved in {last_checkpoint(run_dir)}; "
                                  "continue with the same command and --resume_from_checkpoint true")

    # Everything final is written to run_dir/.saving first and moved in at the end: a save that fails (a full disk)
    # leaves the run dir as it was (checkpoints included), never half an adapter.
    stage = run_dir / STAGE
    try:
        if trainer.is_world_process_zero():
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir(parents=True)
        trainer.accelerator.wait_for_everyone()
        save_model_gathered(trainer, str(stage))
        metrics = _train_metrics(result, trainer, data, runtime, world)
        if data.eval is not None:
            metrics.update(task.final_eval(trainer, data, stage))
        metrics["peak_memory_mb"] = round(peak_memory_mb(), 1)
        metrics["data_notes"] = list(data.notes)  # dropped empty rows, held-out splits: counted, never silent
        if trainer.is_world_process_zero():
            # The trainer pickles its arguments here; the resolved recipe holds them, and run dirs stay pickle-free.
            (stage / "training_args.bin").unlink(missing_ok=True)
            tokenizer.save_pretrained(str(stage))
            _save_generation_config(trainer.model, stage)
            save_recipe(recipe, stage)
            write_json(stage / "log_history.json", trainer.state.log_history)
            from .plots import plot_loss_curve

            plot_loss_curve(trainer.state.log_history, stage / "loss_curve.png")
            stage_live_files(run_dir, stage)
            write_json(stage / METRICS_FILE, metrics)  # last: its presence marks a finished run
            replace_final_files(run_dir, stage)
    except OSError as e:
        # The staged files stay where they are: they may be all that is left of this run's final weights.
        raise LoraFtError(f"output_dir {run_dir}: saving the run failed ({e.strerror or e}); what was saved is kept in "
                          f"{stage}; free disk space and rerun (checkpoints are kept: --resume_from_checkpoint true)") from None
    if trainer.is_world_process_zero():
        summary = {k: metrics[k] for k in metrics if k.startswith("eval_") and isinstance(metrics[k], float)}
        log(targs, f"saved run dir {run_dir}  " + "  ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    return run_dir


def check_engine(trainer) -> None:
    """The engine accelerate was launched with is the one that trains: an FSDP or DeepSpeed launch that the
    trainer would run as plain DDP (accelerate drops such plugins on devices it does not support) stops here."""
    launched = [name for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                if os.environ.get(flag, "").lower() == "true"]
    running = {"FSDP": getattr(trainer, "is_fsdp_enabled", False), "DeepSpeed": getattr(trainer, "is_deepspeed_enabled", False)}
    for name in launched:
        if not running[name]:
            raise LoraFtError(f"accelerate launched {name}, but the trainer set up {trainer.accelerator.distributed_type} on "
                              f"{trainer.args.device}; refusing to train it as something else (`lora-ft doctor RECIPE` says "
                              "what runs where)")


def _save_generation_config(model, run_dir: Path) -> None:
    """Generating runs keep their generation config (EOS ids, pad id) next to the chat template: serving uses both."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    gc = getattr(base, "generation_config", None)
    if gc is not None and getattr(base, "can_generate", lambda: False)():
        gc.save_pretrained(str(run_dir))


RESUME_KEYS = ("task", "model_name_or_path", "dataset_name", "dataset_config", "train_split", "max_train_samples", "max_length",
               "lora_r", "lora_alpha", "lora_target_modules", "use_dora", "load_in_4bit", "load_in_8bit", "use_peft",
               "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps", "seed",
               "preference_method", "beta", "loss_type")


def resume_info(recipe: Recipe, data) -> dict:
    """What a checkpoint must agree with to be resumed: recipe keys that shape the run, and the data itself."""
    d = recipe.to_dict()
    return {"recipe": {k: d.get(k) for k in RESUME_KEYS}, "train_fingerprint": getattr(data.train, "_fingerprint", None),
            "train_examples": len(data.train)}


def last_checkpoint(run_dir: Path):
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None


def check_resume(checkpoint, now: dict) -> None:
    """Refuse a resume whose checkpoint was trained on other data, model or batch layout."""
    import json

    if checkpoint is None:
        return
    path = Path(checkpoint) / RESUME_FILE
    if not path.is_file():
        return  # a checkpoint from before lora_ft recorded it, or a foreign one: transformers checks what it can
    then = json.loads(path.read_text())
    diff = [f"{k}: {then['recipe'].get(k)} -> {now['recipe'].get(k)}" for k in RESUME_KEYS
            if str(then["recipe"].get(k)) != str(now["recipe"].get(k))]
    if then.get("train_fingerprint") != now.get("train_fingerprint") or then.get("train_examples") != now.get("train_examples"):
        diff.append("the training data changed")
    if diff:
        raise RunDirError(f"resume_from_checkpoint: {Path(checkpoint).name} does not match this recipe ({'; '.join(diff)}); "
                          "restore those settings, or train into a new output_dir")


def _resume_arg(recipe: Recipe, run_dir: Path):
    r = recipe.trainer.get("resume_from_checkpoint")
    if r in (None, False, "false", "False", ""):
        return None
    if r in (True, "true", "True"):
        return True if any(run_dir.glob("checkpoint-*")) else None
    return r


def _train_metrics(result, trainer, data, runtime: float, world: int) -> dict:
    m = dict(result.metrics)
    state = trainer.state
    args = trainer.args
    seen = min(state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
               math.ceil(args.num_train_epochs) * len(data.train))
    tokens = data.train_tokens * seen / max(1, len(data.train))
    m["train_tokens_per_second"] = round(tokens / max(m.get("train_runtime", runtime), 1e-9), 2)
    m["train_examples"] = len(data.train)
    m["world_size"] = world
    m["global_step"] = state.global_step
    before = [h for h in state.log_history if h.get("step") == 0 and any(k.startswith("eval_") for k in h)]
    if before:
        m.update({f"{k}_before": v for k, v in before[0].items() if k in ("eval_loss", "eval_accuracy", "eval_macro_f1")})
    return m
