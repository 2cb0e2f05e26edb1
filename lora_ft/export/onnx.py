"""ONNX export of merged classification and seq2seq models, verified with onnxruntime against torch.

Classification: one graph, (input_ids, attention_mask) -> logits.
Seq2seq: encoder.onnx and decoder.onnx (no KV cache: simple and portable; greedy decoding re-runs the
decoder on the growing prefix). Verification decodes greedily with onnxruntime and compares tokens with
torch's own greedy generation.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from ..errors import LoraFtError
from ..outputs import check_output, output_dir
from ..runs import write_json
from ..trust import NONE, Trust

REPORT_FILE = "export_report.json"

SAMPLE_TEXTS = [
    "what a great day",
    "ugh, stuck in traffic again and late for work",
    "The meeting is at 3 pm in room 204.",
    "question: What is the capital of France? context: Paris is the capital and largest city of France.",
    "I can't believe how good this new phone is, the battery lasts forever!",
]
OPSET = 18
GRAPHS = ("logits", "token-logits", "encoder-decoder")  # the graph kinds a task's ONNX_GRAPH may name
# The wrappers below are exported in eval mode (`.eval()`): the exporter puts a module back into the mode it
# found it in, and a fresh wrapper is in training mode, so the wrapped model came back with dropout on and the
# torch side of the verification (and anything run after) went random.


def _classification(model, tok, tmp: Path, texts: list[str], encode, per_token: bool = False) -> dict:
    """encode(texts, return_tensors) -> model inputs, the task's own inference encoding; per_token: logits per position
    (token classification), so the sequence axis of the output is dynamic too."""
    import numpy as np
    import onnxruntime as ort
    import torch

    class Classifier(torch.nn.Module):
        """Passes the inputs by name: the exporter calls positionally, and decoder classifiers (GPT-2) take
        past_key_values, not attention_mask, as their second positional argument."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).logits

    enc = encode(texts[:2], "pt")
    path = tmp / "model.onnx"
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "logits": {0: "batch", 1: "seq"} if per_token else {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(Classifier(model).eval(), (enc["input_ids"], enc["attention_mask"]), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs, agree = [], []
    for text in texts:  # one at a time and as a padded batch: both shapes must work
        e = encode([text], "np")
        got = sess.run(None, {"input_ids": e["input_ids"].astype(np.int64), "attention_mask": e["attention_mask"].astype(np.int64)})[0]
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(e["input_ids"]), attention_mask=torch.from_numpy(e["attention_mask"])).logits.numpy()
        diffs.append(float(np.abs(got - ref).max()))
        agree.append(bool((got.argmax(-1) == ref.argmax(-1)).all()))
    eb = encode(texts, "np")
    batch = sess.run(None, {"input_ids": eb["input_ids"].astype(np.int64), "attention_mask": eb["attention_mask"].astype(np.int64)})[0]
    with torch.no_grad():
        ref_b = model(**{k: torch.from_numpy(v) for k, v in eb.items() if k in ("input_ids", "attention_mask")}).logits.numpy()
    diffs.append(float(np.abs(batch - ref_b).max()))
    return {"files": ["model.onnx"], "max_abs_logit_diff": max(diffs), "argmax_agreement": sum(agree) / len(agree)}


def _seq2seq(model, tok, tmp: Path, texts: list[str], max_new_tokens: int = 16) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    class Decoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, decoder_input_ids, encoder_hidden_states, attention_mask):
            out = self.m(decoder_input_ids=decoder_input_ids, encoder_outputs=(encoder_hidden_states,),
                         attention_mask=attention_mask, use_cache=False)
            return out.logits

    enc = tok(texts[:2], padding=True, return_tensors="pt")
    start = model.config.decoder_start_token_id
    # Traced with a two-token prefix: at one token the causal mask is skipped (nothing to mask) and the trace
    # keeps that branch, so longer prefixes would see future tokens.
    dec_ids = torch.full((2, 2), start, dtype=torch.long)
    with torch.no_grad():
        hidden = Encoder(model)(enc["input_ids"], enc["attention_mask"])
        torch.onnx.export(Encoder(model).eval(), (enc["input_ids"], enc["attention_mask"]), str(tmp / "encoder.onnx"),
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}, "last_hidden_state": {0: "b", 1: "s"}},
                          opset_version=OPSET, dynamo=False)
        torch.onnx.export(Decoder(model).eval(), (dec_ids, hidden, enc["attention_mask"]), str(tmp / "decoder.onnx"),
                          input_names=["decoder_input_ids", "encoder_hidden_states", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"decoder_input_ids": {0: "b", 1: "t"}, "encoder_hidden_states": {0: "b", 1: "s"},
                                        "attention_mask": {0: "b", 1: "s"}, "logits": {0: "b", 1: "t"}},
                          opset_version=OPSET, dynamo=False)
    es = ort.InferenceSession(str(tmp / "encoder.onnx"), providers=["CPUExecutionProvider"])
    ds = ort.InferenceSession(str(tmp / "decoder.onnx"), providers=["CPUExecutionProvider"])
    eos = model.config.eos_token_id
    same, diffs = 0, []
    for text in texts:
        e = tok([text], return_tensors="np")
        ids, mask = e["input_ids"].astype(np.int64), e["attention_mask"].astype(np.int64)
        h = es.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        seq = [start]
        for _ in range(max_new_tokens):
            logits = ds.run(None, {"decoder_input_ids": np.array([seq], dtype=np.int64), "encoder_hidden_states": h, "attention_mask": mask})[0]
            seq.append(int(logits[0, -1].argmax()))
            if seq[-1] == eos:
                break
        with torch.no_grad():
            ref = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1)[0].tolist()
            # Every position's logits on the last prefix, not only the argmax at its end: a graph that lost its
            # causal mask can still pick the same greedy tokens on a small or undertrained model.
            tf = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       decoder_input_ids=torch.tensor([seq[:-1]]), use_cache=False).logits.numpy()
        diffs.append(float(np.abs(logits - tf).max()))
        same += int(seq == ref[: len(seq)] and (len(seq) == len(ref) or seq[-1] == eos or len(seq) == max_new_tokens + 1))
    return {"files": ["encoder.onnx", "decoder.onnx"], "greedy_token_agreement": same / len(texts), "max_abs_logit_diff": max(diffs)}


def load_merged(model_dir: str, output: str, overwrite: bool, trust: Trust):
    """(folder, model, tokenizer, recipe) of the merged folder an export reads into a folder `output` with a
    REPORT_FILE; the folder and the output are both checked before the model loads, so bad arguments cost nothing."""
    from ..inference import load_run

    src = Path(model_dir)
    if not (src / "config.json").is_file():
        raise LoraFtError(f"export: {model_dir} is not a merged model folder (no config.json); run `lora-ft merge` first")
    check_output(Path(output), REPORT_FILE, sources=[src], overwrite=overwrite, what="export: --output")
    return (src, *load_run(src, trust))


def export_onnx(model_dir: str, output: str, inputs: Optional[list[str]] = None, overwrite: bool = False,
                trust: Trust = NONE) -> dict:
    src, model, tok, recipe = load_merged(model_dir, output, overwrite, trust)
    model = model.float().eval()
    from ..tasks import get_task

    a = recipe.args
    task, graph = a.task, get_task(a.task).ONNX_GRAPH
    if graph not in GRAPHS:
        raise LoraFtError(f"export --format onnx: a {task} model has no ONNX graph here; export it with --format gguf")
    texts = inputs or SAMPLE_TEXTS
    with output_dir(output, REPORT_FILE, sources=[src], overwrite=overwrite, what="export: --output") as tmp:
        if graph == "encoder-decoder":
            check = _seq2seq(model, tok, tmp, texts)
        else:
            encode = lambda t, kind: get_task(task).encode(tok, t, a, return_tensors=kind)  # noqa: E731
            check = _classification(model, tok, tmp, texts, encode, per_token=graph == "token-logits")
        ok = check.get("argmax_agreement", check.get("greedy_token_agreement")) == 1.0 and check.get("max_abs_logit_diff", 0.0) < 1e-3
        report = {"source": str(src), "format": "onnx", "task": task, "opset": OPSET, "n_inputs": len(texts), **check, "verified": ok}
        if not ok:
            raise LoraFtError(f"export: onnxruntime output differs from torch ({check}); nothing written")
        tok.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        for name in ("lora_ft_recipe.yaml", "merge_report.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        write_json(tmp / REPORT_FILE, report)
    return report
