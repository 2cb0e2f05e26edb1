"""`lora-ft export MODEL --format ollama`: Modelfile + GGUF. No ollama binary here, so the TEMPLATE is rendered with
a Go-template renderer (lora_ft/export/gotemplate.py) for sample conversations and compared with the HF chat
template's text; ChatML (SmolLM2's and Qwen2's default system prompts) and Llama 3 are known, others refused.
"""

from __future__ import annotations

import json

import pytest
import yaml

from lora_ft.cli import main
from lora_ft.errors import LoraFtError
from lora_ft.export import gotemplate, ollama
from test_export_gguf import CHATML, build_tiny

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
         "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
         "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] "
           "+ ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


def tokenizer(template: str, llama3: bool = False):
    """A byte-level BPE tokenizer with the family's special tokens (Llama 3 adds <|begin_of_text|> itself)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"] if llama3
                else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["a tiny corpus for a tiny tokenizer"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if llama3:
        raw.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=specials[0], eos_token=specials[-1] if llama3 else "<|im_end|>")
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template, family, default", [(SMOLLM2, "chatml", "named SmolLM"), (QWEN2, "chatml", "helpful assistant."),
                                                       (CHATML, "chatml", None), (LLAMA3, "llama3", None)])
def test_template_renders_the_hf_text(template, family, default):
    tok = tokenizer(template, llama3=family == "llama3")
    got, go, check = ollama.choose_template(tok, "You are a pirate.")
    assert got == family and check["identical"] and check["n_checked"] == 2 * len(ollama.SAMPLES)
    assert (default in go) if default else ("system" not in go)
    # the check itself, spelled out for one multi-turn chat with a system turn and one without any
    bos = "<|begin_of_text|>" if family == "llama3" else ""
    for msgs in ([{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "c"}], [{"role": "user", "content": "only"}]):
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ollama.ollama_text(go, msgs, None, bos) == want


def test_system_prompt_is_prepended_as_ollama_does():
    tok = tokenizer(SMOLLM2)
    _, go, _ = ollama.choose_template(tok, "Be terse.")
    msgs = [{"role": "user", "content": "hi"}]
    text = ollama.ollama_text(go, msgs, "Be terse.", "")
    assert text == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert "SmolLM" in ollama.ollama_text(go, msgs, None, "")  # no SYSTEM: the template's own default, as HF


def test_unknown_template_refused_naming_the_known(tmp_path):
    with pytest.raises(LoraFtError, match="ChatML .* Llama 3") as e:
        ollama.choose_template(tokenizer(MISTRAL), None)
    assert "\n" not in str(e.value)


def test_bos_the_template_does_not_render_is_refused(tmp_path):
    """A tokenizer that adds BOS under a ChatML template that does not render it: Ollama would prepend BOS to
    every prompt, which training never saw."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tiny(tmp_path / "src"))
    with pytest.raises(LoraFtError, match="adds BOS <s>"):
        ollama.choose_template(tok, None)


def test_a_wrong_template_fails_the_check(monkeypatch):
    """The comparison can fail: ChatML without the newline after the role is not chosen."""
    broken = lambda d: ollama._chatml(d).replace("{{ $m.Role }}\n", "{{ $m.Role }}")  # noqa: E731
    monkeypatch.setitem(ollama.FAMILIES, "chatml", (broken, *ollama.FAMILIES["chatml"][1:]))
    with pytest.raises(LoraFtError, match="renders differently"):
        ollama.choose_template(tokenizer(CHATML), None)


def test_gotemplate_subset():
    data = {"Messages": [{"Role": "user", "Content": "x"}], "N": 2}
    assert gotemplate.render("a  {{- if eq .N 2 }} two {{- else }}other{{ end -}}  b", data) == "a twob"
    assert gotemplate.render('{{ range $i, $m := .Messages }}{{ $i }}:{{ $m.Role }}{{ end }}{{ len $.Messages }}', data) == "0:user1"
    with pytest.raises(gotemplate.TemplateError):
        gotemplate.render("{{ .Messages | json }}", data)


def test_export_folder_ready_for_ollama_create(tmp_path, capsys):
    """Through the CLI: model.gguf (verified), Modelfile with FROM, TEMPLATE, stop and the recipe's SYSTEM."""
    src = build_tiny(tmp_path / "src", add_bos=False)  # as SmolLM2 and Qwen2: the ChatML text is the whole prompt
    (src / "lora_ft_recipe.yaml").write_text(yaml.safe_dump({"task": "causal-lm", "system_prompt": "You are terse."}))
    out = tmp_path / "ollama"
    assert main(["export", str(src), "--format", "ollama", "--output", str(out), "--llamacpp", "off"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf", "ollama_report.json"]
    assert report["verified"] and report["template_family"] == "chatml" and report["stop"] == ["<|im_end|>"]
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\nTEMPLATE \"\"\"{{- range $i, $m := .Messages }}")
    assert 'PARAMETER stop "<|im_end|>"\n' in text and text.endswith('SYSTEM """You are terse."""\n')
    # a second export replaces its own folder; a foreign folder is refused
    assert main(["export", str(src), "--format", "ollama", "--output", str(out), "--llamacpp", "off"]) == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main(["export", str(src), "--format", "ollama", "--output", str(foreign), "--llamacpp", "off"]) == 2
    assert (foreign / "notes.txt").read_text() == "keep"
