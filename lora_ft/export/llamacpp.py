"""llama.cpp itself runs an exported GGUF (through llama-cpp-python, the optional `llamacpp` extra).

transformers' GGUF reader checks the file's content; this checks what users run: llama.cpp's tokenizer on the
file's vocabulary, its graph for the architecture, its greedy tokens and its end-of-generation set, and the chat
path (the file's own chat template rendered by llama-cpp-python, generation stopping at the end-of-turn token).
"""

from __future__ import annotations

import os
from typing import Optional

# Measured on SmolLM2-135M (logit scale 38) against the fp32 source: f16 max |logit diff| 0.07 (ggml also rounds
# the activations to f16 in its f16 matmuls), greedy identical; q8_0 1.6. Teacher-forced argmax is judged as in
# gguf.py, so one near-tie flip is one step and a broken tensor or tokenizer is all of them.
TOLERANCE = {"f16": {"argmax": 0.97, "atol": 0.1, "rtol": 0.01}, "q8_0": {"argmax": 0.8, "atol": 0.3, "rtol": 0.075}}
N_CTX = 512


def version() -> Optional[str]:
    """llama-cpp-python's version where it imports, else None (it is an optional extra)."""
    try:
        import llama_cpp
    except Exception:  # not installed, or a build whose shared library does not load on this CPU
        return None
    return getattr(llama_cpp, "__version__", "unknown")


def load(path, lora: Optional[str] = None):
    """A llama.cpp context on `path` (plus a LoRA adapter), with logits for every position, quiet."""
    from llama_cpp import Llama

    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=N_CTX, n_batch=N_CTX,
                 n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False, seed=0)


def is_eog(llm, token: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token))


def greedy(llm, ids: list[int], n_new: int) -> list[int]:
    """Greedy tokens after `ids`, the end-of-generation token included (as transformers' generate returns it)."""
    out = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(t))
        if is_eog(llm, t) or len(out) >= n_new:
            break
    return out


def logits(llm, ids: list[int]):
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def tokenize(llm, text: str, add_special: bool) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)


def chat_formatter_prompt(llm, messages: list[dict]) -> Optional[str]:
    """The prompt llama-cpp-python's chat completion renders from the file's tokenizer.chat_template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    f = Jinja2ChatFormatter(template=template, eos_token=llm.detokenize([llm.token_eos()]).decode("utf-8", "replace"),
                            bos_token=llm.detokenize([llm.token_bos()]).decode("utf-8", "replace"))
    return f(messages=messages).prompt


def compare(llm, model, tok, prompts: list[list[int]], n_new: int, quant: str, chats: Optional[list] = None,
            texts: tuple = ()) -> dict:
    """llama.cpp on the file vs the transformers reference model: tokenizer, greedy, teacher-forced logits, chat."""
    import torch

    from ..inference import _eos_ids

    bad = [t for t in texts if tokenize(llm, t, True) != tok(t)["input_ids"]]
    eos = _eos_ids(model, tok, bool(chats)) or None
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos or [0])[0]
    ref, new = [], [greedy(llm, p, n_new) for p in prompts]
    diff, scale, same, step = 0.0, 0.0, [], []
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])
            ref.append(model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, do_sample=False,
                                      eos_token_id=eos, pad_token_id=pad)[0, len(p):].tolist())
            ids = p + ref[-1]
            a = model(input_ids=torch.tensor([ids])).logits[0].float()
            b = torch.from_numpy(logits(llm, ids))[:, : a.shape[-1]]
            diff, scale = max(diff, float((a - b).abs().max())), max(scale, float(a.abs().max()))
            eq = (a.argmax(-1) == b.argmax(-1)).tolist()
            same += eq
            step += eq[len(p) - 1: len(p) - 1 + len(ref[-1])]
    prefix = [next((i for i, (a, b) in enumerate(zip(r, n)) if a != b), min(len(r), len(n))) for r, n in zip(ref, new)]
    # llama.cpp also ends generation on tokens it recognizes by text (<|endoftext|>, <|eot_id|>, ...) that the
    # model's generation config does not list: the same tokens up to there, then llama.cpp stops. Reported apart.
    early = [bool(n) and n != r and r[: len(n)] == n and is_eog(llm, n[-1]) and n[-1] not in (eos or []) for r, n in zip(ref, new)]
    t = TOLERANCE[quant]
    tol, agree = t["atol"] + t["rtol"] * scale, (sum(same) / len(same), sum(step) / max(1, len(step)))
    check = {"engine": f"llama-cpp-python {version()}", "tokenizer_mismatches": bad,
             "greedy_exact": [r == n for r, n in zip(ref, new)],
             "greedy_same_until_llamacpp_stop": [r == n or e for r, n, e in zip(ref, new, early)],
             "llamacpp_extra_stops": sorted({llm.detokenize([n[-1]], special=True).decode("utf-8", "replace")
                                             for n, e in zip(new, early) if e}),
             "greedy_prefix_agreement": sum(prefix) / max(1, sum(max(len(r), len(n)) for r, n in zip(ref, new))),
             "argmax_agreement": agree[0], "greedy_step_agreement": agree[1], "max_abs_logit_diff": diff,
             "logit_scale": scale, "tolerance": {"max_abs_logit_diff": tol, "argmax_agreement": t["argmax"]},
             "reference_tokens": ref, "llamacpp_tokens": new}
    problems = [f"llama.cpp tokenizes {len(bad)} test string(s) differently" if bad else "",
                f"llama.cpp max |logit diff| {diff:.3g} > {tol:.3g}" if diff > tol else "",
                f"llama.cpp argmax agreement {agree[0]:.3f} (greedy steps {agree[1]:.3f}) < {t['argmax']}" if min(agree) < t["argmax"] else ""]
    if chats:
        same = [r == n or e for r, n, e in zip(ref, new, early)]
        check["chat"] = _chat(llm, tok, chats, [n if e else r for r, n, e in zip(ref, new, early)], n_new, same)
        problems += check["chat"]["problems"]
    check["problems"] = [p for p in problems if p]
    return check


def _chat(llm, tok, chats: list, ref: list[list[int]], n_new: int, same: list[bool]) -> dict:
    """The chat path end to end: same prompt text as the HF template, and the reply stops where transformers' did
    (`ref`: transformers' tokens, cut where llama.cpp's greedy run stopped on one of its extra stop tokens). The
    stop is judged where llama.cpp's greedy tokens equal transformers' (`same`): q8_0 may take another path."""
    stop_ids = set(_eot_ids(tok)) | {r[-1] for r in ref if r and is_eog(llm, r[-1])}
    rendered, replies, problems = [], [], []
    for msgs, r, comparable in zip(chats, ref, same):
        hf = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        rendered.append(chat_formatter_prompt(llm, msgs) == hf)
        out = llm.create_chat_completion(messages=msgs, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                         repeat_penalty=1.0, max_tokens=n_new, seed=0)
        choice = out["choices"][0]
        stopped = bool(r) and r[-1] in stop_ids
        want = tok.decode(r[:-1] if stopped else r, skip_special_tokens=True)
        got = choice["message"]["content"] or ""
        # None where the tokens are not valid UTF-8 (random models): transformers shows U+FFFD, llama-cpp-python
        # holds the bytes back or drops them, so the texts are not comparable; the tokens were compared above
        replies.append({"text": got, "finish_reason": choice["finish_reason"],
                        "same_text": None if "\ufffd" in want else got.strip() == want.strip(),
                        "stopped_at_end_of_turn": choice["finish_reason"] == "stop", "reference_stopped": stopped,
                        "same_greedy_tokens": comparable})
    if not all(rendered):
        problems.append(f"llama.cpp's chat template renders {rendered.count(False)} prompt(s) differently from the HF template")
    if any(x["same_greedy_tokens"] and x["reference_stopped"] and not x["stopped_at_end_of_turn"] for x in replies):
        problems.append("llama.cpp's chat completion did not stop at the end-of-turn token where transformers did")
    return {"template_renders_same": rendered, "replies": replies, "problems": problems}


def _eot_ids(tok) -> list[int]:
    from ..inference import end_of_turn_id

    eot = end_of_turn_id(tok) if tok.chat_template else None
    return [i for i in (tok.eos_token_id, eot) if i is not None]
