"""Small, shared adjustments to the upstream trainers: ordered eval, atomic checkpoints, Ctrl-C and NaN stops."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import signal

from . import upstream

CHECKPOINT_STAGE = ".checkpoint-stage"  # a checkpoint is written here whole, then renamed into place
ASIDE = ".old"  # suffix of a checkpoint moved into CHECKPOINT_STAGE while its replacement is renamed in
RESUME_FILE = "lora_ft_resume.json"  # in each checkpoint: the recipe identity and data fingerprint it was trained with


def _eval_sampler_hook():
    from transformers import Trainer

    return upstream.expect_params(Trainer._get_eval_sampler, "self", "eval_dataset")


def _checkpoint_hook():
    from transformers import Trainer, trainer_utils
    from transformers.trainer_callback import TrainerState

    return upstream.first_problem(
        upstream.expect_params(Trainer._save_checkpoint, "self", "model", "trial"),
        upstream.expect_attrs(trainer_utils, "PREFIX_CHECKPOINT_DIR", "rotate_checkpoints"),
        upstream.expect_params(trainer_utils.rotate_checkpoints, "output_dir", "save_total_limit", "best_model_checkpoint",
                               "use_mtime", "checkpoint_prefix"),
        None if "best_global_step" in {f.name for f in dataclasses.fields(TrainerState)} else "TrainerState has no best_global_step",
    )


upstream.register(upstream.Patch("ordered_eval", "transformers", "eval batches in dataset order (off: train batches are not length-grouped)",
                                 _eval_sampler_hook))
upstream.register(upstream.Patch("atomic_checkpoints", "transformers", "checkpoints written whole, then renamed",
                                 _checkpoint_hook))


@functools.lru_cache(maxsize=None)
def lora_ft_trainer(trainer_cls):
    """`trainer_cls` with lora_ft's adjustments.

    - Evaluation keeps dataset order: transformers also length-groups *eval* batches under group_by_length, which
      permutes predictions relative to rows; our metrics and eval_predictions.jsonl pair each prediction with its row.
    - Checkpoints are atomic: written under run_dir/.checkpoint-stage and renamed, so a crash mid-write never leaves a
      half checkpoint-N for `resume_from_checkpoint: true` to pick up. Each carries lora_ft_resume.json.
    - Stop flags set by callbacks (`interrupted`, `nan_step`) keep a bad state from being checkpointed.
    """

    class LoraFtTrainer(trainer_cls):
        resume_info: dict | None = None
        interrupted: bool = False
        nan_step: int | None = None

        def _get_eval_sampler(self, eval_dataset):
            from torch.utils.data import SequentialSampler

            if eval_dataset is None:
                return None
            return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

        def _save_checkpoint(self, model, trial):
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            if self.nan_step is not None:  # never checkpoint weights a NaN/inf loss has touched
                return
            run_dir = self.args.output_dir
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            stage = os.path.join(run_dir, CHECKPOINT_STAGE)
            if self.args.should_save:
                shutil.rmtree(stage, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            self.args.output_dir = stage
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = run_dir
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                import json

                from transformers.trainer_utils import rotate_checkpoints

                staged = os.path.join(stage, name)
                if self.resume_info is not None:
                    with open(os.path.join(staged, RESUME_FILE), "w", encoding="utf-8") as fh:
                        json.dump(self.resume_info, fh, indent=2)
                final = os.path.join(run_dir, name)
                # An older checkpoint-N (a re-run saving the same step) goes aside, not away: until the rename
                # below, it is the only whole copy of that step. A kill in between: restore_checkpoints() puts it back.
                aside = os.path.join(stage, name + ASIDE)
                if os.path.exists(final):
                    os.replace(final, aside)
                try:
                    os.replace(staged, final)
                except OSError:
                    if os.path.exists(aside):
                        os.replace(aside, final)
                    raise
                shutil.rmtree(stage, ignore_errors=True)
                if self.state.best_global_step:
                    best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
                    if os.path.isdir(best):
                        self.state.best_model_checkpoint = best
                rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
            self.accelerator.wait_for_everyone()

    # Overrides of private Trainer methods stand only where transformers still calls them the way they expect.
    if not upstream.usable("ordered_eval"):
        del LoraFtTrainer._get_eval_sampler
        LoraFtTrainer.__init__ = _without_length_grouping(LoraFtTrainer)
    if not upstream.usable("atomic_checkpoints"):
        del LoraFtTrainer._save_checkpoint
    LoraFtTrainer.__name__ = LoraFtTrainer.__qualname__ = f"LoraFt{trainer_cls.__name__}"
    return LoraFtTrainer


def _without_length_grouping(cls):
    """`cls.__init__` for the upstream path, where eval order cannot be kept by the override: transformers 5
    length-groups eval batches too under group_by_length, so training batches go back to random order and eval
    stays in dataset order (predictions pair with their rows)."""

    def __init__(self, *args, **kwargs):
        super(cls, self).__init__(*args, **kwargs)
        if self.args.train_sampling_strategy == "group_by_length":
            self.args.train_sampling_strategy = "random"

    return __init__


def restore_checkpoints(run_dir) -> None:
    """Put back a checkpoint-N left aside by a run killed between the two renames of a checkpoint save."""
    stage = os.path.join(run_dir, CHECKPOINT_STAGE)
    if not os.path.isdir(stage):
        return
    for entry in os.listdir(stage):
        final = os.path.join(run_dir, entry[: -len(ASIDE)])
        if entry.endswith(ASIDE) and not os.path.exists(final):
            os.replace(os.path.join(stage, entry), final)


def mean_loss(trainer):
    """Declare that the model's loss is a per-example mean that ignores `num_items_in_batch` (sequence classifiers,
    T5). Their forward takes **kwargs, so transformers would assume otherwise and then multiply the loss by the
    process count under DDP and skip the division by gradient_accumulation_steps: gradients N or k times too large."""
    trainer.model_accepts_loss_kwargs = False
    return trainer


def stop_callbacks(trainer):
    """Callbacks that stop a run cleanly: on Ctrl-C (checkpoint first) and on a NaN/inf loss (no checkpoint)."""
    from transformers import TrainerCallback

    class GuardCallback(TrainerCallback):
        def __init__(self):
            self.previous = None

        def on_train_begin(self, args, state, control, **kw):
            try:
                self.previous = signal.signal(signal.SIGINT, self._on_sigint)
            except ValueError:  # not the main thread (a server, a notebook worker): leave signals alone
                self.previous = None

        def _on_sigint(self, signum, frame):
            trainer.interrupted = True
            if self.previous is not None:  # a second Ctrl-C stops at once
                signal.signal(signal.SIGINT, self.previous)

        def on_step_end(self, args, state, control, **kw):
            if trainer.interrupted:
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            # grad_norm too: transformers' logging_nan_inf_filter would smooth a NaN loss out of the log.
            bad = [k for k in ("loss", "grad_norm") if (logs or {}).get(k) is not None and not math.isfinite(float(logs[k]))]
            if bad:
                trainer.nan_step = state.global_step
                control.should_save = False
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kw):
            if self.previous is not None:
                signal.signal(signal.SIGINT, self.previous)

    return GuardCallback()


def save_model_gathered(trainer, output_dir: str) -> None:
    """`trainer.save_model`, with the weights gathered from every process under FSDP whatever its
    fsdp_state_dict_type: transformers 5.24 writes no weights at all for SHARDED_STATE_DICT (checkpoints still
    get their sharded copy), which would leave a finished run dir without its adapter. A collective: every rank."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if not getattr(trainer, "is_fsdp_enabled", False) or "FULL_STATE_DICT" in str(plugin.state_dict_type):
        trainer.save_model(output_dir)
        return
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # full tensors on the main process, CPU
    trainer._save(output_dir, state_dict=state_dict)
