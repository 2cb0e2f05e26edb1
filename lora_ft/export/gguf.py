"""GGUF export for Llama-family causal LMs (llama.cpp, Ollama, LM Studio), verified before it is kept.

The file is written the way llama.cpp's convert_hf_to_gguf.py writes a Llama: its tensor names, the Q/K row
permutation, 1-D tensors in f32, the byte-level BPE vocabulary as "gpt2" tokenizer metadata. It is then read
back with transformers' own GGUF loader (an implementation independent of the writer) and must reproduce the
source model's tokenization, logits and greedy tokens; otherwise nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LoraFtError
from ..outputs import check_output, output_file

MARK_KEY = "general.lora_ft"

SUPPORTED_TYPES = ("llama",)
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
# HF name -> llama.cpp name inside blk.N (convert_hf_to_gguf's tensor map for LLAMA).
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


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
    mt = json.loads((src / "config.json").read_text(encoding="utf-8")).get("model_type")
    if mt not in SUPPORTED_TYPES:
        raise LoraFtError(f"export: GGUF export supports model_type {', '.join(SUPPORTED_TYPES)} (Llama family: Llama, SmolLM2, ...); {model_dir} is {mt!r}")


def _check_config(c) -> None:
    """Refuse what transformers' GGUF loader cannot read back (so could not be verified) or llama.cpp treats otherwise."""
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    problems = [f"rope type {rope.get('rope_type')!r}" if rope.get("rope_type", "default") != "default" else "",
                "attention/MLP biases" if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False) else "",
                f"activation {c.hidden_act!r}" if c.hidden_act != "silu" else ""]
    if any(problems):
        raise LoraFtError(f"export: GGUF export does not support {', '.join(p for p in problems if p)} (plain Llama only)")


def _permute(w, n_head: int):
    """llama.cpp's Q/K row order: HF rotates halves of each head, llama.cpp adjacent pairs (K: the KV heads)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model, quant: str):
    """(name, numpy array, raw ggml type or None) in llama.cpp naming, layout and types."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    c = model.config
    tied = bool(getattr(c, "tie_word_embeddings", False))
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        parts = hf.split(".")
        if hf in TOP_NAMES:
            name = TOP_NAMES[hf]
        elif parts[:2] == ["model", "layers"] and ".".join(parts[3:-1]) in LAYER_NAMES:
            name = f"blk.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
        else:
            raise LoraFtError(f"export: tensor {hf} has no llama.cpp equivalent; this is not a plain Llama model")
        w = t.detach().float().cpu().numpy()
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            w = _permute(w, c.num_attention_heads if ".attn_q." in name else c.num_key_value_heads)
        if w.ndim == 1:  # norms: tiny, and precision-critical; llama.cpp keeps them f32
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
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer") or pre is None:
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
    if template:
        w.add_chat_template(template if isinstance(template, str) else [{"name": k, "template": v} for k, v in template.items()])
    return {"model": "gpt2", "pre": pre, "n_tokens": n_vocab, "n_merges": len(merges), "add_bos": add_bos,
            "add_eos": add_eos, "chat_template": bool(template)}


def _write(model, tok, path: Path, quant: str, name: str) -> dict:
    from collections import Counter

    import gguf

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    n_vocab = model.get_input_embeddings().weight.shape[0]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string(MARK_KEY, "lora-ft export")  # first: `export` replaces only files it finds this in
    theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    for key, value in (("name", name), ("context_length", c.max_position_embeddings), ("embedding_length", c.hidden_size),
                       ("block_count", c.num_hidden_layers), ("feed_forward_length", c.intermediate_size),
                       ("head_count", c.num_attention_heads), ("head_count_kv", c.num_key_value_heads),
                       ("rope_dimension_count", head_dim), ("rope_freq_base", theta),
                       ("layer_norm_rms_eps", float(c.rms_norm_eps)), ("vocab_size", n_vocab)):
        getattr(w, f"add_{key}")(value)  # llama.<key> as llama.cpp and transformers' GGUF config mapping read it
    if head_dim != c.hidden_size // c.num_attention_heads:  # llama.cpp otherwise derives it from the widths
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    if quant != "f16":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok_info = _add_tokenizer(w, tok, n_vocab)
    types = Counter()
    for tname, data, raw in _gguf_tensors(model, quant):
        w.add_tensor(tname, data, raw_dtype=raw)
        types[(raw.name if raw is not None else {"float32": "F32", "float16": "F16"}[data.dtype.name])] += 1
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return {"tokenizer": tok_info, "tensor_types": dict(types), "n_tensors": sum(types.values())}


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


def export_gguf(model_dir: str, output: str, quant: str = "f16", overwrite: bool = False) -> dict:
    """Write `output` (a .gguf file) from the HF folder `model_dir`; returns the report. Raises LoraFtError."""
    _check_source(model_dir, quant)
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
    _check_config(model.config)
    # A private folder beside the output: the same filesystem for an atomic rename, and nothing else in it, so
    # the read-back cannot pick up a tokenizer.json or config.json that happens to sit next to the output.
    with output_file(out, gguf_by_lora_ft, sources=[Path(model_dir)], overwrite=overwrite, what="export: --output") as path:
        report = {"model_dir": str(model_dir), "output": str(out), "quant": quant}
        report.update(_write(model, tok, path, quant, Path(model_dir).resolve().name))
        report["size_bytes"] = path.stat().st_size
        report["size_mb"] = round(report["size_bytes"] / 2**20, 1)
        report["verification"] = _verify(model, tok, path.parent, path.name, quant)
        report["verified"] = not report["verification"]["problems"]
        if not report["verified"]:
            raise LoraFtError(f"export: the GGUF file read back does not match {model_dir} ({'; '.join(report['verification']['problems'])}); nothing written")
    return report


def gguf_by_lora_ft(path: Path) -> bool:
    """A GGUF file lora_ft wrote: its metadata, near the top (written first), names lora_ft (MARK_KEY)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return head.startswith(b"GGUF") and MARK_KEY.encode() in head
