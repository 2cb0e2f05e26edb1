"""GGUF export of Llama, Qwen2 and GPT-2 family causal LMs (llama.cpp, Ollama, LM Studio), verified before it is kept.

The file is written the way llama.cpp's convert_hf_to_gguf.py writes these architectures (gguf_arch.py: tensor
names, the Llama Q/K row permutation, GPT-2's transposed Conv1D weights), 1-D tensors in f32, the byte-level BPE
vocabulary as "gpt2" tokenizer metadata with the chat template. It is then read back with transformers' own GGUF
loader (an implementation independent of the writer) and must reproduce the source model's tokenization, logits
and greedy tokens; where llama-cpp-python is installed, llama.cpp itself runs the file too (llamacpp.py).
Otherwise nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import LoraFtError
from ..outputs import check_output, output_file
from .gguf_arch import FAMILIES, get_arch, permute

MARK_KEY = "general.lora_ft"

QUANTS = ("f16", "q8_0")
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "List three colors:"]
N_NEW = 16
# Where the split regexes differ (contractions in capitals, digit runs, newline runs, punctuation before letters),
# so a wrong pre-tokenizer name shows up as different ids; plus non-ASCII text for the byte-level alphabet.
TEXTS = ["Hello world! I'M SURE IT'S fine, isn't it?", "  two leading spaces,\ttabs\n\n\nand   new lines  \n",
         "Numbers 1234567 and 3.14;(x)... café naïve 日本語 🙂", "the sea.The sky,blue!!!red"]
# Verified means: identical tokenization and chat template; argmax agreement (over 3 prompts plus their greedy
# continuations, teacher-forced) at least the floor; max |logit diff| within atol + rtol * logit scale. f16
# rounding (2^-11 relative) flips only near-ties; q8_0 (8-bit blocks of 32) moves logits more. A wrong
# permutation or tensor fails both. Measured on SmolLM2-135M (logit scale 38): f16 max diff 0.04 and greedy
# exact; q8_0 max diff 1.3.
TOLERANCE = {"f16": {"argmax": 0.98, "atol": 0.05, "rtol": 0.005}, "q8_0": {"argmax": 0.8, "atol": 0.2, "rtol": 0.075}}


def _check_source(model_dir: str, quant: str) -> None:
    """One-line errors for what is wrong before anything heavy is imported or loaded."""
    if quant not in QUANTS:
        raise LoraFtError(f"export: --quant {quant} is not supported; choose one of {', '.join(QUANTS)}")
    src = Path(model_dir)
    if not src.is_dir():
        raise LoraFtError(f"export: {model_dir} is not a folder; pass a merged model folder (`lora-ft merge RUN --output DIR`)")
    if not (src / "config.json").is_file():
        hint = "it holds a LoRA adapter; merge it first with `lora-ft merge`" if (src / "adapter_config.json").is_file() else "no config.json"
        raise LoraFtError(f"export: {model_dir} is not a full model folder ({hint})")
    check_model_type(json.loads((src / "config.json").read_text(encoding="utf-8")).get("model_type"), model_dir)


def check_model_type(mt, where) -> None:
    if get_arch(mt) is None:
        raise LoraFtError(f"export: GGUF export supports model_type {FAMILIES}; {where} is {mt!r}")


def check_config(c) -> None:
    """Refuse what transformers' GGUF loader cannot read back (so could not be verified) or llama.cpp treats otherwise."""
    problems = [p for p in get_arch(c.model_type).problems(c) if p]
    if problems:
        raise LoraFtError(f"export: GGUF export of {c.model_type} does not support {', '.join(problems)}")


def _permute(w, n_head: int):
    return permute(w, n_head)  # one seam for the Q/K row order (the writer and the LoRA export; tests break it here)


def tensor_name(arch, hf: str):
    """(llama.cpp name, its stem without .weight/.bias) for a state-dict key; raises on one llama.cpp has no place for."""
    module, _, kind = hf.rpartition(".")
    stem = arch.module(module)
    if stem is None or kind not in ("weight", "bias"):
        raise LoraFtError(f"export: tensor {hf} has no llama.cpp equivalent in a plain {arch.gguf} model")
    return f"{stem}.{kind}", stem


def to_layout(arch, c, hf: str, w):
    """(llama.cpp name, numpy array in llama.cpp's layout) for one HF state-dict tensor (numpy, float32)."""
    name, stem = tensor_name(arch, hf)
    if arch.transposed and w.ndim == 2 and stem.startswith("blk."):
        w = w.T.copy()
    heads = arch.heads(stem, c)
    return name, (_permute(w, heads) if heads else w)


def gguf_tensors(state: dict, c, quant: str):
    """(name, numpy array, raw ggml type or None) in llama.cpp naming, layout and types, from an HF state dict."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    arch = get_arch(c.model_type)
    tied = bool(getattr(c, "tie_word_embeddings", False))
    for hf, t in state.items():
        if hf == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if hf.endswith((".attn.bias", ".attn.masked_bias")) and arch.transposed:
            continue  # old GPT-2 checkpoints' causal-mask buffers
        name, w = to_layout(arch, c, hf, t.detach().float().cpu().numpy())
        if w.ndim == 1:  # norms and biases: tiny, and precision-critical; llama.cpp keeps them f32
            yield name, w.astype(np.float32), None
        elif quant == "q8_0" and w.shape[-1] % 32 == 0:  # Q8_0 blocks run along a row
            yield name, quantize(w, T.Q8_0), T.Q8_0
        else:
            yield name, w.astype(np.float16), None


def _pre_tokenizer(pre: dict) -> str | None:
    """llama.cpp's name for the split regex, for the ones transformers' GGUF loader can rebuild too."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    seq = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(seq) == 2 and seq[0].get("type") == "Split" and seq[1].get("type") == "ByteLevel" and not seq[1].get("use_regex", True):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS as splits

        regex = seq[0].get("pattern", {}).get("Regex")
        # convert_hf_to_gguf's own names first; the table lists aliases of the same regex after them
        for name in sorted(splits, key=lambda n: n not in ("llama-bpe", "qwen2", "gpt-4o", "tekken")):
            if splits[name] == regex and seq[0].get("behavior") == "Isolated" and not seq[0].get("invert"):
                return name
    return None


def _add_tokenizer(w, tok, n_vocab: int) -> dict:
    """Byte-level BPE as llama.cpp's "gpt2" model: tokens in id order, types, merges, special ids, template."""
    from gguf import TokenType

    spec = json.loads(tok.backend_tokenizer.to_str())
    model, pre = spec.get("model") or {}, _pre_tokenizer(spec.get("pre_tokenizer") or {})
    # NFC (Qwen2's) is what llama.cpp's converter drops too: text already in NFC, nearly all text, encodes the same.
    norm = (spec.get("normalizer") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or norm not in (None, "NFC") or pre is None:
        raise LoraFtError("export: GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2 style) only; "
                          f"this one is {model.get('type')} with pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')}")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise LoraFtError(f"export: the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} embeddings")
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [TokenType.UNUSED] * n_vocab  # llama.cpp pads the same way
    added = tok.added_tokens_decoder
    for s, i in vocab.items():
        tokens[i] = s
        types[i] = (TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED) if i in added else TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    for add, value in ((w.add_tokenizer_model, "gpt2"), (w.add_tokenizer_pre, pre), (w.add_token_list, tokens),
                       (w.add_token_types, types), (w.add_token_merges, merges), (w.add_bos_token_id, tok.bos_token_id),
                       (w.add_eos_token_id, tok.eos_token_id), (w.add_unk_token_id, tok.unk_token_id),
                       (w.add_pad_token_id, tok.pad_token_id)):
        if value is not None:
            add(value)
    # What the tokenizer does, not what a flag says: llama.cpp adds BOS/EOS only on these.
    plain, full = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
    add_bos = tok.bos_token_id is not None and full[:1] == [tok.bos_token_id] and plain[:1] != full[:1]
    add_eos = tok.eos_token_id is not None and full[-1:] == [tok.eos_token_id] and plain[-1:] != full[-1:]
    w.add_add_bos_token(add_bos), w.add_add_eos_token(add_eos)
    template = tok.chat_template
    eot = None
    if template:
        from ..inference import end_of_turn_id

        w.add_chat_template(template if isinstance(template, str) else [{"name": k, "template": v} for k, v in template.items()])
        # Training labels the turn's closing token: llama.cpp must stop there also where eos is another token.
        eot = end_of_turn_id(tok)
        if eot is not None and eot != tok.eos_token_id:
            w.add_eot_token_id(eot)
    return {"model": "gpt2", "pre": pre, "n_tokens": n_vocab, "n_merges": len(merges), "add_bos": add_bos,
            "add_eos": add_eos, "chat_template": bool(template), "end_of_turn_id": eot}


def write_gguf(state: dict, c, tok, path: Path, quant: str, name: str, n_vocab: int) -> dict:
    """The model file: metadata under <arch>.<key> as llama.cpp and transformers' GGUF config mapping read it."""
    from collections import Counter

    import gguf

    arch = get_arch(c.model_type)
    w = gguf.GGUFWriter(str(path), arch.gguf)
    w.add_string(MARK_KEY, "lora-ft export")  # first: `export` replaces only files it finds this in
    w.add_name(name)
    for key, value in arch.hparams(c, n_vocab):
        getattr(w, f"add_{key}")(value)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    if quant != "f16":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok_info = _add_tokenizer(w, tok, n_vocab)
    types = Counter()
    for tname, data, raw in gguf_tensors(state, c, quant):
        w.add_tensor(tname, data, raw_dtype=raw)
        types[(raw.name if raw is not None else {"float32": "F32", "float16": "F16"}[data.dtype.name])] += 1
    finish(w)
    return {"architecture": arch.gguf, "tokenizer": tok_info, "tensor_types": dict(types), "n_tensors": sum(types.values())}


def finish(w) -> None:
    """Write a filled gguf.GGUFWriter out (header, key-values, tensors) and close it, whatever fails."""
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def _verify(model, tok, folder: Path, file: str, quant: str) -> dict:
    """Read the file back with transformers (tokenizer and model) and compare with the source, in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..inference import _eos_ids, render_prompt

    gtok = AutoTokenizer.from_pretrained(str(folder), gguf_file=file)
    gmodel = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=file, dtype=torch.float32).eval()
    chat = bool(tok.chat_template)
    texts = TEXTS + [f"{tok.bos_token or ''}x{tok.eos_token or ''} y"]
    if chat:
        texts.append(tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False, add_generation_prompt=True))
    tok_bad = [t for t in texts if tok(t)["input_ids"] != gtok(t)["input_ids"]]
    template_ok = (gtok.chat_template == tok.chat_template) if chat else True
    eos = _eos_ids(model, tok, chat) or None
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos or [0])[0]

    def greedy(m, ids):
        x = torch.tensor([ids])
        with torch.no_grad():
            out = m.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=N_NEW, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad)
        return out[0, len(ids):].tolist()

    prompts = [render_prompt(tok, p, chat) for p in PROMPTS]
    ref = [greedy(model, p) for p in prompts]
    new = [greedy(gmodel, render_prompt(gtok, p, chat)) for p in PROMPTS]  # each with its own tokenizer
    prefix = [next((i for i, (a, b) in enumerate(zip(r, n)) if a != b), min(len(r), len(n))) for r, n in zip(ref, new)]
    # Free-running greedy diverges for good after one near-tie flips; judge each step on the same history instead
    # (the reference continuation, teacher-forced), so one rounding flip is one step, and a broken tensor is all.
    diff, scale, same, step = 0.0, 0.0, [], []
    with torch.no_grad():
        for p, r in zip(prompts, ref):
            ids = torch.tensor([p + r])
            a, b = model(input_ids=ids).logits[0], gmodel(input_ids=ids).logits[0]
            diff, scale = max(diff, float((a - b).abs().max())), max(scale, float(a.abs().max()))
            eq = (a.argmax(-1) == b.argmax(-1)).tolist()
            same += eq
            step += eq[len(p) - 1: len(p) - 1 + len(r)]
    t, agree = TOLERANCE[quant], (sum(same) / len(same), sum(step) / max(1, len(step)))
    tol = t["atol"] + t["rtol"] * scale
    check = {"tokenizer_mismatches": tok_bad, "chat_template_preserved": template_ok,
             "greedy_exact": [r == n for r, n in zip(ref, new)],
             "greedy_prefix_agreement": sum(prefix) / max(1, sum(max(len(r), len(n)) for r, n in zip(ref, new))),
             "argmax_agreement": agree[0], "greedy_step_agreement": agree[1], "max_abs_logit_diff": diff,
             "logit_scale": scale, "tolerance": {"max_abs_logit_diff": tol, "argmax_agreement": t["argmax"]},
             "n_prompts": len(PROMPTS), "max_new_tokens": N_NEW, "reference_tokens": ref, "gguf_tokens": new}
    problems = [f"tokenizer encodes {len(tok_bad)} test string(s) differently" if tok_bad else "",
                "" if template_ok else "chat template not preserved",
                f"max |logit diff| {diff:.3g} > {tol:.3g}" if diff > tol else "",
                f"argmax agreement {agree[0]:.3f} (greedy steps {agree[1]:.3f}) < {t['argmax']}" if min(agree) < t["argmax"] else ""]
    check["problems"] = [p for p in problems if p]
    return check


LLAMACPP_MODES = ("auto", "require", "off")


def llamacpp_wanted(mode: str) -> bool:
    """auto: llama.cpp checks the file where llama-cpp-python imports; require: refuse to go on without it."""
    from . import llamacpp

    if mode not in LLAMACPP_MODES:
        raise LoraFtError(f"export: --llamacpp {mode} is not one of {', '.join(LLAMACPP_MODES)}")
    if mode == "require" and llamacpp.version() is None:
        raise LoraFtError("export: --llamacpp require, but llama-cpp-python does not import; install it with `make llamacpp` "
                          "(or pip install -e '.[llamacpp]')")
    return mode != "off" and llamacpp.version() is not None


def check_with_llamacpp(path: Path, model, tok, quant: str, lora: Optional[Path] = None) -> dict:
    """llama.cpp runs the file (base + `lora` for an adapter) on the verification prompts against `model`."""
    from ..inference import render_prompt
    from . import llamacpp

    chat = bool(tok.chat_template)
    llm = llamacpp.load(path, lora)
    try:
        return llamacpp.compare(llm, model, tok, [render_prompt(tok, p, chat) for p in PROMPTS], N_NEW, quant,
                                chats=[[{"role": "user", "content": p}] for p in PROMPTS] if chat else None,
                                texts=tuple(TEXTS))
    finally:
        llm.close()


def export_gguf(model_dir: str, output: str, quant: str = "f16", overwrite: bool = False, llama_cpp: str = "auto") -> dict:
    """Write `output` (a .gguf file) from the HF folder `model_dir`; returns the report. Raises LoraFtError."""
    _check_source(model_dir, quant)
    use_llamacpp = llamacpp_wanted(llama_cpp)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(output)
    if out.is_dir():
        raise LoraFtError(f"export: --output {output} is a folder; give a file name such as model.gguf")
    check_output(out, gguf_by_lora_ft, sources=[Path(model_dir)], overwrite=overwrite, what="export: --output", folder=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if getattr(tok, "backend_tokenizer", None) is None:
        raise LoraFtError(f"export: {model_dir} has no fast (tokenizer.json) tokenizer to describe in GGUF")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    check_config(model.config)
    # A private folder beside the output: the same filesystem for an atomic rename, and nothing else in it, so
    # the read-back cannot pick up a tokenizer.json or config.json that happens to sit next to the output.
    with output_file(out, gguf_by_lora_ft, sources=[Path(model_dir)], overwrite=overwrite, what="export: --output") as path:
        report = {"model_dir": str(model_dir), "output": str(out), "quant": quant}
        report.update(write_gguf(model.state_dict(), model.config, tok, path, quant, Path(model_dir).resolve().name,
                                 model.get_input_embeddings().weight.shape[0]))
        report["size_bytes"] = path.stat().st_size
        report["size_mb"] = round(report["size_bytes"] / 2**20, 1)
        import transformers

        report["verification"] = _verify(model, tok, path.parent, path.name, quant)
        report["checked_by"] = [f"transformers {transformers.__version__} (gguf_file= reader)"]
        problems = list(report["verification"]["problems"])
        if use_llamacpp:
            report["verification_llamacpp"] = check_with_llamacpp(path, model, tok, quant)
            report["checked_by"].append(report["verification_llamacpp"]["engine"])
            problems += report["verification_llamacpp"]["problems"]
        report["verified"] = not problems
        if not report["verified"]:
            raise LoraFtError(f"export: the GGUF file read back does not match {model_dir} ({'; '.join(problems)}); nothing written")
    return report


def gguf_by_lora_ft(path: Path) -> bool:
    """A GGUF file lora_ft wrote: its metadata, near the top (written first), names lora_ft (MARK_KEY)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return head.startswith(b"GGUF") and MARK_KEY.encode() in head
