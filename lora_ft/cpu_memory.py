"""Keep a bitsandbytes-quantized load on CPU from holding the full-precision checkpoint in memory (Linux, glibc).

Measured on a SmolLM2-1.7B-shaped model loaded in 4-bit on CPU (0.96 GB of parameters after quantization):
- quantizing frees each full-precision tensor, but glibc's heap keeps the freed memory (its mmap threshold grows
  with the first large frees), so the load peaks at 8.5 GB with 5.3 GB of anonymous memory still held after it;
  allocations of 1 MiB and up served by mmap during the load give that memory back at once (peak 4.6 GB);
- the unquantized tensors (embeddings, norms) are zero-copy views into the memory-mapped checkpoint, which keeps
  every page of the file that quantization read resident (3.2 GB); owning copies of them let the mapping go
  (resident 4.4 -> 1.5 GB).
Elsewhere (GPU loads, other platforms) these are no-ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import os
import sys

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_LOAD_THRESHOLD = 1 << 20  # during the load: tensors of 1 MiB and up get their own mapping, returned on free
_AFTER_THRESHOLD = 32 << 20  # after it: glibc's own ceiling for the dynamic threshold, so training allocates as usual


@functools.lru_cache(maxsize=1)
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def lean_quantized_load(active: bool):
    """Around a quantized CPU load: large temporaries are returned to the OS as they are freed."""
    # A user's own MALLOC_MMAP_THRESHOLD_ (see README "Performance") is left as they set it.
    libc = _glibc() if active and "MALLOC_MMAP_THRESHOLD_" not in os.environ else None
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _LOAD_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:  # release_checkpoint_mapping, run after the load, trims the heap
            libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_THRESHOLD)


def release_checkpoint_mapping(model) -> None:
    """Give the unquantized parameters and buffers their own memory so the checkpoint's mapping can close."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            for p in module._parameters.values():
                if p is not None and p.device.type == "cpu" and p.dtype.is_floating_point:
                    p.data = p.data.clone()
            for name, b in module._buffers.items():
                if b is not None and b.device.type == "cpu":
                    module._buffers[name] = b.clone()
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
