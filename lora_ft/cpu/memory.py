"""Keep a bitsandbytes-quantized load on CPU from holding the full-precision checkpoint in memory (Linux, glibc).

Measured on a SmolLM2-1.7B-shaped model loaded in 4-bit on CPU (0.96 GB of parameters after quantization):
- quantizing frees each full-precision tensor, but glibc's heap keeps the freed memory (its mmap threshold grows
  with the first large frees), so the load peaks at 8.5 GB with 5.3 GB of anonymous memory still held after it;
  allocations of 1 MiB and up served by mmap during the load give that memory back at once (peak 4.6 GB);
- the unquantized tensors (embeddings, norms) are zero-copy views into the memory-mapped checkpoint, which keeps
  every page of the file that quantization read resident (3.2 GB); owning copies of them let the mapping go
  (resident 4.4 -> 1.5 GB);
- while the load runs, every checkpoint page read so far stays mapped into this process and counts in its resident
  memory (load peak 5.2 GB, 3.3 GB of it file pages of a 3.4 GB bf16 checkpoint); reclaiming the checkpoint
  mapping's pages after each tensor is quantized keeps the peak near the quantized model's size (2.1 GB; see
  `reclaim_new_file_pages`).
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
from typing import NamedTuple

from .. import upstream

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_MADV_PAGEOUT = 21  # Linux 5.4+ madvise advice: reclaim these pages now (never changes their contents)
_LOAD_THRESHOLD = 1 << 20  # during the load: tensors of 1 MiB and up get their own mapping, returned on free
_AFTER_THRESHOLD = 32 << 20  # after it: glibc's own ceiling for the dynamic threshold, so training allocates as usual


@functools.lru_cache(maxsize=1)
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if all(hasattr(libc, f) for f in ("mallopt", "malloc_trim", "madvise")) else None
    except OSError:
        return None


@contextlib.contextmanager
def lean_quantized_load(active: bool):
    """Around a quantized CPU load: large temporaries are returned to the OS as they are freed, and checkpoint pages
    already read are dropped from this process as each tensor is quantized."""
    libc = _glibc() if active else None
    # A user's own MALLOC_MMAP_THRESHOLD_ (see README "Performance") is left as they set it.
    set_threshold = libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ
    if set_threshold:
        libc.mallopt(_M_MMAP_THRESHOLD, _LOAD_THRESHOLD)
    restore = []
    if libc is not None:
        already_mapped = {m.file for m in _file_mappings()}  # other models' zero-copy weights are not this load's
        restore = _after_each_quantization(lambda: reclaim_new_file_pages(already_mapped))
    try:
        yield
    finally:
        for cls, original in restore:
            cls._quantize = original
        if set_threshold:  # release_checkpoint_mapping, run after the load, trims the heap
            libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_THRESHOLD)


def _relies_on():
    import bitsandbytes as bnb

    missing = [c.__name__ for c in (bnb.nn.Params4bit, bnb.nn.Int8Params) if "_quantize" not in c.__dict__]
    return f"bitsandbytes' {', '.join(missing)} quantize elsewhere" if missing else None


upstream.register(upstream.Patch("cpu_memory", "bitsandbytes", "checkpoint pages reclaimed as a quantized CPU load goes",
                                 _relies_on))


def _after_each_quantization(hook) -> list:
    """Run `hook` after bitsandbytes quantizes each weight (4- and 8-bit). Returns what to restore."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    if not upstream.usable("cpu_memory"):  # no hook: only the usual (higher) load peak
        return []
    restore = []
    for cls in (bnb.nn.Params4bit, bnb.nn.Int8Params):
        original = cls.__dict__.get("_quantize")
        if original is None:  # another bitsandbytes layout: no hook, only the usual (higher) load peak
            continue

        def quantize_then_hook(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            hook()
            return out

        cls._quantize = quantize_then_hook
        restore.append((cls, original))
    return restore


class _Mapping(NamedTuple):
    start: int
    end: int
    perms: str
    file: tuple[str, int]  # (device, inode): a Hub cache maps blobs/<sha>, never the *.safetensors link name
    path: str


def _file_mappings() -> list[_Mapping]:
    """This process's file-backed memory mappings, from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[4] != "0":
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append(_Mapping(start, end, parts[1], (parts[3], int(parts[4])), parts[5].rstrip()))
    return out


def reclaim_new_file_pages(already_mapped: set) -> None:
    """Ask the kernel to reclaim the pages of file mappings made since the load began: the checkpoint's.

    MADV_PAGEOUT is advice, never a change of contents: a clean file page is read back from the file at its next
    access (the zero-copy views of embeddings and norms), a page written in private is kept. Clean file pages were
    always reclaimable under memory pressure; this makes the process's resident memory (what a cgroup or a
    scheduler counts) say so at once. The pages also leave the page cache, so the next load reads the file from
    disk. Kernels before 5.4 refuse the advice (EINVAL), and the kernel skips files this user could not write:
    both leave the usual, higher load peak. Shared libraries loaded meanwhile are left alone.
    """
    libc = _glibc()
    for m in _file_mappings():
        if m.file in already_mapped or "x" in m.perms or ".so" in os.path.basename(m.path):
            continue
        libc.madvise(ctypes.c_void_p(m.start), ctypes.c_size_t(m.end - m.start), _MADV_PAGEOUT)


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
