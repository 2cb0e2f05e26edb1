"""The lean 4-bit CPU load (lora_ft.cpu_memory): hooks come and go with the load, reclaimed pages keep their contents."""

from __future__ import annotations

import pytest
import torch

from lora_ft import cpu_memory

linux_glibc = pytest.mark.skipif(cpu_memory._glibc() is None, reason="glibc on Linux only (elsewhere the module is a no-op)")


@linux_glibc
def test_hook_runs_after_each_quantization_and_is_removed_after_the_load(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    calls = []
    monkeypatch.setattr(cpu_memory, "_drop_checkpoint_pages", lambda: calls.append(1))
    original = bnb.nn.Params4bit._quantize
    with cpu_memory.lean_quantized_load(True):
        assert bnb.nn.Params4bit._quantize is not original
        bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4").to("cpu")
        bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4").to("cpu")
    assert len(calls) == 2
    assert bnb.nn.Params4bit._quantize is original
    with cpu_memory.lean_quantized_load(False):  # GPU loads: nothing patched
        assert bnb.nn.Params4bit._quantize is original


@linux_glibc
def test_reclaimed_checkpoint_pages_read_back_the_same(tmp_path):
    """Zero-copy views into the mapped file stay valid: a reclaimed page is read back from the file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(512, 1024), "b": torch.arange(4096, dtype=torch.float32)}, str(path))
    with safe_open(str(path), "pt") as f:
        w, b = f.get_tensor("w"), f.get_tensor("b")
        expected_w, expected_b = w.clone(), b.clone()
        if not any(ln.rstrip().endswith(".safetensors") for ln in open("/proc/self/maps")):
            pytest.skip("this safetensors version copies tensors: no mapping to reclaim")
        cpu_memory._drop_checkpoint_pages()
        assert torch.equal(w, expected_w) and torch.equal(b, expected_b)
