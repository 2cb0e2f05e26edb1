"""A run's LoRA adapter as a GGUF LoRA adapter: llama.cpp applies it over the base's GGUF (`--lora`, `lora_path=`).

Written as llama.cpp's convert_lora_to_gguf.py writes one: general.type=adapter, adapter.type=lora,
adapter.lora.alpha, and per adapted weight `<base tensor>.lora_a` (r x in) and `.lora_b` (out x r) in the base
tensor's llama.cpp layout (Llama's Q/K row permutation applies to B's rows). llama.cpp scales every pair by
alpha / r; peft's own scale (rsLoRA, rank and alpha patterns) is folded into B, so the file computes what peft
did. Verified twice before it is kept: read back, base + scale * B @ A equals the merged model's weight in
llama.cpp's layout; where llama-cpp-python imports, llama.cpp running the base GGUF with the adapter gives the
merged model's greedy tokens.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..errors import LoraFtError
from ..outputs import check_output, output_file
from ..trust import NONE, Trust
from . import gguf as eg
from .gguf_arch import get_arch

# Read-back of base + alpha/r * B @ A against the merged weight, float32 both: only rounding of the sum differs.
RTOL = 1e-4


def _check_adapter(run: Path) -> dict:
    cfg_path = run / "adapter_config.json"
    if not cfg_path.is_file():
        raise LoraFtError(f"export: {run} has no adapter_config.json; --format gguf-lora takes a run dir with a LoRA "
                          "adapter (for a merged model use --format gguf)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    problems = [f"peft_type {cfg.get('peft_type')}" if cfg.get("peft_type") != "LORA" else "",
                "DoRA (use_dora: llama.cpp has no magnitude vector; merge and use --format gguf)" if cfg.get("use_dora") else "",
                f"modules_to_save {cfg['modules_to_save']} (fully trained modules are no LoRA pair)" if cfg.get("modules_to_save") else "",
                "LoRA biases (lora_bias)" if cfg.get("lora_bias") else "", f"bias={cfg.get('bias')!r}" if cfg.get("bias", "none") != "none" else ""]
    problems = [p for p in problems if p]
    if problems:
        raise LoraFtError(f"export: a GGUF LoRA adapter cannot carry {', '.join(problems)} in {run}")
    return cfg


def _pairs(peft_model, base_config):
    """(llama.cpp base tensor name, A (r, in), B (out, r) with peft's scale folded in for llama.cpp's alpha / r, r)."""
    import numpy as np
    from peft.tuners.lora import LoraLayer

    arch = get_arch(base_config.model_type)
    alpha = None
    for name, mod in peft_model.named_modules():
        if not isinstance(mod, LoraLayer) or "default" not in getattr(mod, "lora_A", {}):
            continue
        if "default" in getattr(mod, "lora_embedding_A", {}):
            raise LoraFtError(f"export: the adapter trains embeddings ({name}); a GGUF LoRA adapter supports linear layers only")
        hf = name.removeprefix("base_model.model.") + ".weight"
        try:
            gname, stem = eg.tensor_name(arch, hf)
        except LoraFtError:
            raise LoraFtError(f"export: the adapter targets {hf}, which has no llama.cpp tensor in a {arch.gguf} model") from None
        if gname == "output.weight" and getattr(base_config, "tie_word_embeddings", False):
            raise LoraFtError("export: the adapter targets lm_head, which llama.cpp shares with the embeddings in this "
                              "model; retrain without lm_head in lora_target_modules")
        a = mod.lora_A["default"].weight.detach().float().cpu().numpy()
        b = mod.lora_B["default"].weight.detach().float().cpu().numpy()
        r = a.shape[0]
        alpha = float(mod.lora_alpha["default"]) if alpha is None else alpha
        b = b * _scale_fold(float(mod.scaling["default"]), r, alpha)
        heads = arch.heads(stem, base_config)
        yield gname, a, (_b_rows(b, heads) if heads else b).astype(np.float32), alpha


def _scale_fold(scaling: float, r: int, alpha: float) -> float:
    """What B is multiplied by so llama.cpp's alpha / r gives peft's scale: 1 for plain LoRA, sqrt(r) for rsLoRA."""
    return scaling * r / alpha


def _b_rows(b, heads: int):
    return eg._permute(b, heads)  # W's rows are permuted, so delta = B @ A needs B's rows permuted the same way


def _write(pairs: list, c, path: Path, name: str) -> dict:
    import gguf

    w = gguf.GGUFWriter(str(path), get_arch(c.model_type).gguf)
    w.add_string(eg.MARK_KEY, "lora-ft export")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, pairs[0][3])
    w.add_name(name)
    for gname, a, b, _ in pairs:
        w.add_tensor(f"{gname}.lora_a", a)
        w.add_tensor(f"{gname}.lora_b", b)
    eg.finish(w)
    return {"architecture": get_arch(c.model_type).gguf, "n_pairs": len(pairs), "lora_alpha": pairs[0][3],
            "ranks": sorted({int(a.shape[0]) for _, a, _, _ in pairs})}


def _read_back(path: Path, base_state: dict, merged_state: dict, c) -> dict:
    """From the file as llama.cpp reads it: every pair names a base tensor of the right shape, and
    base + alpha / r * B @ A equals the merged model's weight in llama.cpp's layout."""
    import numpy as np
    from gguf import GGUFReader

    arch = get_arch(c.model_type)
    rd = GGUFReader(path)
    alpha = float(rd.fields["adapter.lora.alpha"].contents())
    ts = {t.name: np.array(t.data, dtype=np.float32) for t in rd.tensors}
    layout = {}
    for hf, t in base_state.items():
        if not (hf == "lm_head.weight" and getattr(c, "tie_word_embeddings", False)):
            name, wl = eg.to_layout(arch, c, hf, t.float().numpy())
            layout[name] = (hf, wl)
    worst, problems = 0.0, []
    for n in sorted(k[: -len(".lora_a")] for k in ts if k.endswith(".lora_a")):
        if n not in layout:
            problems.append(f"{n} is no tensor of the base GGUF")
            continue
        hf, base = layout[n]
        a, b = ts[n + ".lora_a"], ts[n + ".lora_b"]
        merged = eg.to_layout(arch, c, hf, merged_state[hf].float().numpy())[1]
        got = base + (alpha / a.shape[0]) * (b @ a)
        worst = max(worst, float(np.abs(got - merged).max() / max(1e-12, float(np.abs(merged).max()))))
    if worst > RTOL:
        problems.append(f"base + adapter differs from the merged weights by {worst:.3g} (relative) > {RTOL}")
    return {"max_rel_weight_diff": worst, "problems": problems}


def export_gguf_lora(run_dir: str, output: str, overwrite: bool = False, llama_cpp: str = "auto", trust: Trust = NONE) -> dict:
    from ..config import load_run_recipe
    from ..merge import _load
    from ..runs import require_run_dir
    from ..trust import granted

    run = require_run_dir(run_dir)
    _check_adapter(run)
    use_llamacpp = eg.llamacpp_wanted(llama_cpp)
    out = Path(output)
    if out.is_dir():
        raise LoraFtError(f"export: --output {output} is a folder; give a file name such as adapter.gguf")
    check_output(out, eg.gguf_by_lora_ft, sources=[run], overwrite=overwrite, what="export: --output", folder=False)
    recipe = granted(load_run_recipe(run), trust, run)
    model, tok = _load(run, recipe, "float32", quantized=False)
    base = model.get_base_model()
    c = base.config
    eg.check_model_type(c.model_type, run_dir)
    eg.check_config(c)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if type(base).__name__ not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        raise LoraFtError(f"export: {run_dir} adapts a {type(base).__name__}; llama.cpp runs causal LMs only")
    pairs = list(_pairs(model, c))
    if not pairs:
        raise LoraFtError(f"export: {run_dir} has no LoRA layers to export")
    # base weights as llama.cpp holds them: the state dict without the adapter's wrappers
    base_state = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v.detach().clone()
                  for k, v in model.state_dict().items() if ".lora_" not in k}
    merged = model.merge_and_unload().eval()
    report = {"run_dir": str(run), "output": str(out), "base_model": recipe.args.model_name_or_path,
              "checked_by": ["gguf read-back (base + adapter == merged weights)"]}
    with output_file(out, eg.gguf_by_lora_ft, sources=[run], overwrite=overwrite, what="export: --output") as path:
        report.update(_write(pairs, c, path, run.resolve().name))
        report["size_mb"] = round(path.stat().st_size / 2**20, 2)
        report["verification"] = _read_back(path, base_state, merged.state_dict(), c)
        problems = list(report["verification"]["problems"])
        if use_llamacpp and not problems:
            with tempfile.TemporaryDirectory(prefix="lora-ft-base-") as tmp:
                base_file = Path(tmp) / "base-f16.gguf"
                eg.write_gguf(base_state, c, tok, base_file, "f16", "base", base_state[_embed_key(c)].shape[0])
                report["verification_llamacpp"] = eg.check_with_llamacpp(base_file, merged, tok, "f16", lora=path)
            report["checked_by"].append(report["verification_llamacpp"]["engine"] + " (f16 base GGUF + this adapter vs the merged model)")
            problems += report["verification_llamacpp"]["problems"]
        report["verified"] = not problems
        if problems:
            raise LoraFtError(f"export: the GGUF LoRA adapter does not reproduce the merged model ({'; '.join(problems)}); nothing written")
    report["use"] = (f"export the base once (`lora-ft export BASE_DIR --format gguf --output base.gguf`), then "
                     f"llama.cpp: --model base.gguf --lora {out.name}; llama-cpp-python: Llama(model_path='base.gguf', lora_path='{out.name}')")
    return report


def _embed_key(c) -> str:
    return "transformer.wte.weight" if get_arch(c.model_type).transposed else "model.embed_tokens.weight"
