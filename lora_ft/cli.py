"""`lora-ft` entry point. Imports stay light here so `lora-ft --help` answers at once."""

from __future__ import annotations

import argparse
import os
import sys

from .commands import compare, compress, data, doctor, env, export, generate, merge, models, plan, predict, push, search, serve, train
from .commands import eval as eval_cmd

COMMANDS = {"train": train, "doctor": doctor, "plan": plan, "search": search, "compare": compare, "eval": eval_cmd, "predict": predict, "generate": generate, "merge": merge, "compress": compress, "export": export, "push": push, "serve": serve, "models": models, "data": data, "env": env}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-ft", description="LoRA/QLoRA fine-tuning from YAML recipes")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in COMMANDS.values():
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = make_parser().parse_known_args(argv)
    return run_command(args, rest)


def run_command(args, rest: list[str]) -> int:
    from .errors import LoraFtError, RecipeError, TrainingInterrupted

    if args.command != "models":
        _quiet_libraries()
    try:
        return COMMANDS[args.command].run(args, rest) or 0
    except RecipeError as e:
        for line in e.problems:
            print(f"lora-ft: error: {line}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"lora-ft: {e}", file=sys.stderr)
        return 130
    except LoraFtError as e:
        print(f"lora-ft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-ft: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Library chatter that is harmless and would bury our own messages. Set before transformers and datasets are
    imported where it can be (their environment switches), so a recipe mistake is reported before either loads."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # Environment switches, read when transformers and datasets are imported: a recipe mistake is then reported
    # before either loads. Verbosity: load reports list the freshly initialised head, which lora_ft reports itself in
    # one line. Bars: "Loading weights" and dataset maps (transformers' own disable_progress_bar turns off every Hub
    # bar too); training keeps its own tqdm. A user's own setting of any of them wins.
    quiet = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    for name, value in quiet.items():
        os.environ.setdefault(name, value)
    if "transformers" in sys.modules:  # imported before us (a notebook, a test): too late for its environment
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


if __name__ == "__main__":
    sys.exit(main())
