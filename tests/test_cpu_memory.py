"""The lean 4-bit CPU load (lora_ft.cpu.memory): hooks come and go with the load, reclaimed pages keep their contents."""

from __future__ import annotations

import pytest
import torch

from lora_ft.cpu import memory as cpu_memory

linux_glibc = pytest.mark.skipif(cpu_memory._glibc() is None, reason="glibc on Linux only (elsewhere the module is a no-op)")


@linux_glibc
def test_hook_runs_after_each_quantization_and_is_removed_after_the_load(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    calls = []
    monkeypatch.setattr(cpu_memory, "reclaim_new_file_pages", lambda already_mapped: calls.append(1))
    original = bnb.nn.Params4bit._quantize
    with cpu_memory.lean_quantized_load(True):
        assert bnb.nn.Params4bit._quantize is not original
        bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4").to("cpu")
        bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4").to("cpu")
    assert len(calls) == 2
    assert bnb.nn.Params4bit._quantize is original
    with cpu_memory.lean_quantized_load(False):  # GPU loads: nothing patched
        assert bnb.nn.Params4bit._quantize is original


def mapping_rss_kb(path) -> int:
    """Resident KB of this process's mappings of `path` (its real path), from /proc/self/smaps."""
    import os

    real, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header line
                inside = line.rstrip().endswith(real)
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


@linux_glibc
def test_only_the_new_checkpoint_pages_are_reclaimed_and_read_back_the_same(tmp_path):
    """A checkpoint mapped during the load (reached through a Hub-cache-style symlink) leaves resident memory and its
    zero-copy views still read the same; a file mapped before the load is left alone."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    old, blob = tmp_path / "old.safetensors", tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    save_file({"w": torch.randn(256, 1024)}, str(old))
    save_file({"w": torch.randn(512, 1024), "b": torch.arange(4096, dtype=torch.float32)}, str(blob))
    (tmp_path / "model.safetensors").symlink_to(blob)
    with safe_open(str(old), "pt") as f_old:
        kept = f_old.get_tensor("w")
        kept.sum()  # touch every page
        already_mapped = {m.file for m in cpu_memory._file_mappings()}
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            w, b = f.get_tensor("w"), f.get_tensor("b")
            expected_w, expected_b = w.clone(), b.clone()
            if mapping_rss_kb(blob) == 0:
                pytest.skip("this safetensors version copies tensors: no mapping to reclaim")
            old_rss = mapping_rss_kb(old)
            cpu_memory.reclaim_new_file_pages(already_mapped)
            assert mapping_rss_kb(blob) < 64, "the new checkpoint's pages stayed resident"
            assert mapping_rss_kb(old) == old_rss
            assert torch.equal(w, expected_w) and torch.equal(b, expected_b)
