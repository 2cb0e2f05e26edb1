"""`lora-ft export MODEL --format ollama --output DIR`: the GGUF plus a Modelfile, a folder ready for `ollama create`.

The Modelfile's TEMPLATE is the run's chat template in Ollama's Go-template syntax. HF templates are Jinja and
cannot be translated in general, so the known families are written out here (ChatML: SmolLM2, Qwen2; Llama 3)
and the one whose rendering equals the HF template's on sample conversations (system, multi-turn, none) is
chosen; its default system prompt, where the HF template inserts one, is carried along. The chosen TEMPLATE is
then rendered with Ollama's semantics (gotemplate.py; SYSTEM is prepended as a system message where a chat has
none) and must give the text training saw, token for token, or nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import LoraFtError
from ..outputs import output_dir
from . import gotemplate

REPORT = "ollama_report.json"
MODEL = "model.gguf"
# Sample conversations: a user turn alone, with a system turn, and multi-turn with and without one.
SAMPLES = [[("user", "What is the capital of France?")],
           [("system", "You answer in one word."), ("user", "Capital of Italy?")],
           [("user", "Hi!"), ("assistant", "Hello. How can I help?"), ("user", "Name a color.")],
           [("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("user", "And 3+3?")]]


def _lit(text: str) -> str:
    """Template text as a Go string literal (JSON's escapes are Go's for this alphabet)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def _chatml(default_system: Optional[str]) -> str:
    first = ("{{- if and (eq $i 0) (ne $m.Role \"system\") }}" + _lit(f"<|im_start|>system\n{default_system}<|im_end|>\n")
             + "{{ end }}") if default_system is not None else ""
    return ("{{- range $i, $m := .Messages }}" + first + "<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n"
            "{{ end }}<|im_start|>assistant\n")


def _llama3(default_system: Optional[str]) -> str:
    first = ("{{- if and (eq $i 0) (ne $m.Role \"system\") }}"
             + _lit(f"<|start_header_id|>system<|end_header_id|>\n\n{default_system}<|eot_id|>") + "{{ end }}"
             ) if default_system is not None else ""
    return ("{{- range $i, $m := .Messages }}" + first + "<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n"
            "{{ $m.Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")


# family -> (Go template for a default system prompt or None, how the HF text opens a default system turn)
FAMILIES = {"chatml": (_chatml, "<|im_start|>system\n", "<|im_end|>"),
            "llama3": (_llama3, "<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")}
SUPPORTED = "ChatML (SmolLM2, Qwen2, ...) and Llama 3"


def hf_text(tok, msgs: list[dict], system: Optional[str]) -> str:
    """What training and `lora-ft generate` render: the recipe's system turn added where a chat has none."""
    if system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}] + msgs
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def ollama_text(template: str, msgs: list[dict], system: Optional[str], bos: str) -> str:
    """What Ollama feeds llama.cpp: SYSTEM prepended as a system message where none is given, then the TEMPLATE;
    the BOS token comes from the tokenizer (GGUF add_bos_token), not from the template."""
    if system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}] + msgs
    return bos + gotemplate.render(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in msgs]})


def _default_system(tok, opens: str, closes: str, bos: str) -> Optional[str]:
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    text = text[len(bos):] if bos and text.startswith(bos) else text
    return text[len(opens):].split(closes, 1)[0] if text.startswith(opens) and closes in text else None


def choose_template(tok, system: Optional[str]) -> tuple[str, str, dict]:
    """(family, Go TEMPLATE, per-sample check) for the tokenizer's chat template; refuses the unknown."""
    if not tok.chat_template:
        raise LoraFtError("export: --format ollama needs a chat template (the model has none; set chat_template in the recipe)")
    bos = tok.bos_token if tok.bos_token and _adds_bos(tok) else ""
    for family, (make, opens, closes) in FAMILIES.items():
        template = make(_default_system(tok, opens, closes, bos))
        checks = [(hf_text(tok, m, s), ollama_text(template, m, s, bos)) for m in _samples() for s in (None, system)]
        if all(a == b for a, b in checks):
            return family, template, {"n_checked": len(checks), "identical": True}
        if bos and all(bos + a == b for a, b in checks):
            raise LoraFtError(f"export: the tokenizer adds BOS {bos} but the chat template does not render it, so Ollama "
                              "would put it before every prompt, which training did not; --format ollama cannot match this model")
    raise LoraFtError(f"export: --format ollama knows the chat templates {SUPPORTED}; this model's renders differently from each "
                      "(export --format gguf, and write the Modelfile's TEMPLATE by hand)")


def _samples() -> list[list[dict]]:
    return [[{"role": r, "content": c} for r, c in s] for s in SAMPLES]


def _adds_bos(tok) -> bool:
    plain, full = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
    return tok.bos_token_id is not None and full[:1] == [tok.bos_token_id] and plain[:1] != full[:1]


def _quoted(value: str, what: str) -> str:
    if '"""' in value:
        raise LoraFtError(f'export: the {what} contains """, which a Modelfile cannot quote; remove it from the recipe')
    return f'"""{value}"""'


def modelfile(template: str, stops: list[str], system: Optional[str]) -> str:
    lines = [f"FROM ./{MODEL}", f"TEMPLATE {_quoted(template, 'chat template')}"]
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'system_prompt')}")
    return "\n".join(lines) + "\n"


def _recipe_system(model_dir: Path) -> Optional[str]:
    """The system prompt the run trained with (merged folders keep the recipe), read as data only."""
    import yaml

    from ..config import RECIPE_FILE

    path = model_dir / RECIPE_FILE
    if not path.is_file():
        return None
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("system_prompt") or None


def export_ollama(model_dir: str, output: str, quant: str = "f16", overwrite: bool = False, llama_cpp: str = "auto") -> dict:
    from transformers import AutoTokenizer

    from ..inference import end_of_turn_id
    from .gguf import _check_source, export_gguf

    _check_source(model_dir, quant)
    src = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    system = _recipe_system(src)
    family, template, check = choose_template(tok, system)  # before the heavy GGUF export
    eot = end_of_turn_id(tok)
    stops = [tok.convert_ids_to_tokens(eot)] if eot is not None else []
    text = modelfile(template, stops, system)
    with output_dir(output, REPORT, sources=[src], overwrite=overwrite, what="export: --output") as tmp:
        report = export_gguf(model_dir, str(tmp / MODEL), quant=quant, llama_cpp=llama_cpp)
        report.update(output=str(output), format="ollama", template_family=family, template_check=check,
                      stop=stops, system=system, modelfile=text)
        report["gguf_output"] = str(Path(output) / MODEL)
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
        (tmp / REPORT).write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    report["use"] = f"cd {output} && ollama create NAME -f Modelfile && ollama run NAME"
    return report
