"""The models a server holds: run dirs, merged folders and plain HF model folders, with runs on one base sharing one
copy of its weights; each model cast once to the serving dtype (lora_ft/serving/speed.py)."""

from __future__ import annotations

import copy
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import LoraFtError
from ..config import RECIPE_FILE
from ..trust import NONE, Trust, granted
from .speed import Speed, cast, mergeable

NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass
class Group:
    """One model object in memory. peft's active adapter is global to it, so every forward holds `lock`."""

    model: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: list[str] = field(default_factory=list)
    generation_config: Any = None  # the base's own, as loaded: the default of every run that saved none
    dtype: str = "float32"  # what its forward computes in (speed.cast)


@dataclass
class ServedModel:
    id: str
    path: Path
    task: str
    recipe: Any
    tok: Any
    group: Group
    adapter: Optional[str]  # peft adapter name inside group.model; None for a whole (merged) model
    generation_config: Any = None  # the run's own (its EOS ids), or the base's; set on the shared model with the adapter

    @property
    def chat(self) -> bool:
        return bool(self.recipe.args.use_chat_template)

    def activate(self) -> Any:
        """The model, switched to this run's adapter (call with group.lock held)."""
        if self.adapter is not None and self.group.model.active_adapter != self.adapter:
            self.group.model.set_adapter(self.adapter)
        if self.generation_config is not None:
            self.group.model.generation_config = self.generation_config
        return self.group.model


def parse_specs(specs: list[str]) -> list[tuple[str, Path]]:
    """`PATH` or `NAME=PATH` -> (name, path); the name defaults to the folder name. Names must be unique."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).resolve().name, spec
        if not NAME_OK.match(name):
            raise LoraFtError(f"serve: model name '{name}' must be 1-128 letters, digits or ._:-; use NAME=PATH")
        if name in [n for n, _ in out]:
            raise LoraFtError(f"serve: two models named '{name}'; name them apart with NAME=PATH")
        out.append((name, Path(path)))
    if not out:
        raise LoraFtError("serve: no models; pass one or more run dirs, merged folders or HF model folders")
    return out


def _base_key(recipe) -> tuple:
    a = recipe.args
    return (a.model_name_or_path, a.task, len(a.labels or []), a.load_in_4bit, a.load_in_8bit, a.dtype, a.load_in_4bit and a.use_dora)


def load_models(specs: list[str], trust: Trust = NONE, speed: Speed = Speed(), task: Optional[str] = None) -> dict[str, ServedModel]:
    """Load every model once; adapters whose base, task, label count and quantization agree share one base.
    task: the task of plain HF folders (default: from their config's architectures)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from ..cpu import dora as cpu_dora
    from ..config import load_run_recipe
    from ..inference import load_plain, load_run
    from ..modeling import fix_pad_token, load_model
    from ..runs import require_run_dir
    from ..tasks import auto_class, get_task
    from .onnx_backend import load_onnx

    groups: dict[tuple, Group] = {}
    served: dict[str, ServedModel] = {}
    for name, path in parse_specs(specs):
        if speed.backend == "onnx":
            dtype = "int8" if speed.dtype == "int8" else "float32"  # onnxruntime runs the exported fp32 graph or its int8 copy
            model, tok, recipe = load_onnx(Path(path), trust, speed.threads, dtype)
            served[name] = ServedModel(name, Path(path), recipe.args.task, recipe, tok, Group(model, dtype=dtype), None)
            continue
        if Path(path).is_dir() and not (Path(path) / RECIPE_FILE).is_file() and (Path(path) / "config.json").is_file():
            model, tok, recipe = load_plain(path, task, trust)  # a base model or one trained elsewhere
            served[name] = ServedModel(name, Path(path), recipe.args.task, recipe, tok, Group(model), None)
            continue
        p = require_run_dir(path)
        recipe = granted(load_run_recipe(p), trust, p)
        if not (p / "adapter_config.json").is_file():  # merged or fully fine-tuned: a model of its own
            model, tok, recipe = load_run(p, trust)
            served[name] = ServedModel(name, p, recipe.args.task, recipe, tok, Group(model), None)
            continue
        a = recipe.args
        tm = get_task(a.task)
        tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=a.trust_remote_code)
        fix_pad_token(tok)
        key = _base_key(recipe)
        adapter = f"a{len(served)}"  # peft names become module keys: no dots, so not the user's name
        if key not in groups:
            extra = tm.reload_kwargs(a)
            base, _ = load_model(a, auto_class(tm), training=False, **extra)
            tm.setup_model(base, tok)
            model = PeftModel.from_pretrained(base, str(p), adapter_name=adapter)
            groups[key] = Group(model, generation_config=copy.deepcopy(getattr(model, "generation_config", None)))
        else:
            groups[key].model.load_adapter(str(p), adapter_name=adapter)
        group = groups[key]
        cpu_dora.install(group.model)  # DoRA adapters: the weight norm once per layer, not per request
        group.adapters.append(adapter)
        group.model.eval()
        # Never None: the shared model would keep the previous adapter's config (its EOS ids) for this run.
        gen = copy.deepcopy(group.generation_config)
        if (p / "generation_config.json").is_file():
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(str(p))
        served[name] = ServedModel(name, p, a.task, recipe, tok, group, adapter, gen)
    # Once per base, after every adapter is in. Labelling models only: generation stays in the dtype `lora-ft
    # generate` runs, so /v1/generate keeps its tokens.
    groups_of = {id(m.group): m for m in served.values() if speed.backend == "torch" and get_task(m.task).predict is not None}
    for m in groups_of.values():
        if m.adapter is not None and len(m.group.adapters) == 1 and mergeable(m.group.model, speed):
            m.group.model, m.adapter = m.group.model.merge_and_unload(), None  # see speed.py: merge
            m.group.adapters = []
        m.group.dtype = cast(m.group.model, speed)
    return served
