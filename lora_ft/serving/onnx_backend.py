"""`lora-ft serve --backend onnx`: merged labelling models run by onnxruntime, through the task's own predict.

A folder written by `lora-ft export --format onnx` is served as it is (its report must say verified); a merged
folder is exported first, into a temporary folder, by the same verified export (onnxruntime must match torch
there, or nothing is served). An adapter run dir is refused: merge it first.

With `--dtype int8` the verified fp32 graph is quantized at start, into a temporary folder, by onnxruntime's dynamic
quantization (int8 weights per output channel, activations per batch) on the MatMuls that speed.int8_layers would
take in torch: constant weights at least INT8_MIN_FEATURES wide and not narrowing. Lossy: benchmarks/serve_load.py
counts the labels it changes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

from ..errors import LoraFtError

_TEMP: list = []  # exports made at startup live as long as the server process


class OnnxModel:
    """An onnxruntime session standing in for the torch model where task.predict uses one: `model(**enc).logits`,
    `model.config`, `next(model.parameters()).device`. So served rows come from the same predict code as torch's."""

    training = False

    def __init__(self, graph: Path, config, threads: int = 0):
        import onnxruntime as ort
        import torch

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        self.graph_path = Path(graph)
        self.session = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        self.config = config
        self._device = torch.zeros(0)

    def parameters(self):
        yield self._device

    def eval(self):
        return self

    def __call__(self, input_ids, attention_mask, token_type_ids=None, **_):
        import numpy as np
        import torch

        # The exported graph takes input_ids and attention_mask only (lora_ft/export/onnx.py): a second segment
        # would be read as the first, so it is refused rather than answered wrong.
        if token_type_ids is not None and bool(token_type_ids.any()):
            raise LoraFtError("serve --backend onnx: the graph has no token_type_ids input; serve text pairs with --backend torch")
        feed = {"input_ids": input_ids.numpy().astype(np.int64), "attention_mask": attention_mask.numpy().astype(np.int64)}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(None, feed)[0]))


def onnx_folder(path: Path, trust) -> Path:
    """A verified ONNX export folder for `path`: itself, or a fresh export of a merged folder."""
    import json

    from ..export.onnx import REPORT_FILE, export_onnx

    if (path / "model.onnx").is_file():
        report = path / REPORT_FILE
        if not report.is_file() or not json.loads(report.read_text(encoding="utf-8")).get("verified"):
            raise LoraFtError(f"serve --backend onnx: {path} has no verified {REPORT_FILE}; export it with `lora-ft export "
                              f"MERGED --format onnx --output {path} --overwrite`")
        return path
    if (path / "adapter_config.json").is_file():
        raise LoraFtError(f"serve --backend onnx: {path} is an adapter run; merge it first (`lora-ft merge {path} --output DIR`) "
                          "and serve DIR, or serve the run with --backend torch")
    tmp = tempfile.TemporaryDirectory(prefix="lora-ft-onnx-")
    _TEMP.append(tmp)
    out = Path(tmp.name) / "onnx"
    export_onnx(str(path), str(out), trust=trust)
    return out


def int8_graph(graph: Path) -> Path:
    """graph with its wide, non-narrowing constant-weight MatMuls dynamically quantized to int8, in a temporary folder."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .speed import INT8_MIN_FEATURES, int8_shape

    model = onnx.load(str(graph), load_external_data=False)  # shapes only: the weights are not needed here
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    # a MatMul's constant weight is (in, out), as int8_shape takes it
    take = [n.name for n in model.graph.node if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2
            and int8_shape(*shapes[n.input[1]])]
    if not take:
        raise LoraFtError(f"serve --backend onnx --dtype int8: {graph} has no MatMul with a constant weight at least "
                          f"{INT8_MIN_FEATURES} wide to quantize; serve it with --dtype float32")
    tmp = tempfile.TemporaryDirectory(prefix="lora-ft-onnx-int8-")
    _TEMP.append(tmp)
    out = Path(tmp.name) / "model.onnx"
    # reduce_range: 7-bit weights, so AVX2 CPUs without VNNI, whose u8 x s8 pair sums saturate at 16 bits, compute
    # exactly (without it 49 of 64 tweet labels changed on an AVX2-only EPYC; with it, 2).
    quantize_dynamic(str(graph), str(out), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                     op_types_to_quantize=["MatMul"], nodes_to_quantize=take)
    return out


def load_onnx(path: Path, trust, threads: int = 0, dtype: str = "float32"):
    """(OnnxModel, tokenizer, recipe) for a merged folder or an ONNX export of one; dtype int8 quantizes the graph."""
    from transformers import AutoConfig, AutoTokenizer

    from ..config import load_run_recipe
    from ..modeling import fix_pad_token
    from ..tasks import get_task
    from ..trust import granted

    recipe = granted(load_run_recipe(path), trust, path)  # export copies the recipe: a merged folder and its export alike
    if get_task(recipe.args.task).predict is None:
        raise LoraFtError(f"serve --backend onnx: {path} is a {recipe.args.task} model; onnx serves labelling models, "
                          "serve it with --backend torch")
    folder = onnx_folder(path, trust)
    tok = AutoTokenizer.from_pretrained(str(folder))
    fix_pad_token(tok)
    graph = int8_graph(folder / "model.onnx") if dtype == "int8" else folder / "model.onnx"
    return OnnxModel(graph, AutoConfig.from_pretrained(str(folder)), threads), tok, recipe
