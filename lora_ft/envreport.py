"""What `lora-ft env` reports for a bug report: versions, the CPU and what lora_ft decides from it, CUDA devices,
the precision a run would train in and which of lora_ft's CPU fast paths are on."""

from __future__ import annotations

import os
import platform
import sys

from . import hardware, upstream

LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets")
# Variables that change what lora_ft or torch do on this machine.
ENV_VARS = (hardware.CAPABILITY_ENV, "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
            "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_", "OPENBLAS_CORETYPE", "CUDA_VISIBLE_DEVICES")
FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma")
# Where each guarded patch applies, beyond its library being the tested one.
APPLIES = {
    "cpu_linear4bit": "training a 4-bit base on CPU",
    "cpu_dora": "DoRA adapters on CPU",
    "cpu_lm_head": "causal-LM training on CPU",
    "cpu_memory": "quantized loads on CPU",
    "ordered_eval": "every run",
    "atomic_checkpoints": "every run",
    "keep_4bit_layout": "4-bit training and DoRA",
    "cpu_fsdp": "FSDP launches on CPU processes",
}


def collect() -> dict:
    import torch

    info = hardware.cpu_info()
    versions = {"python": platform.python_version(), "lora_ft": upstream.installed_version(upstream.DIST)}
    outside = {}
    for lib in LIBRARIES:
        versions[lib] = upstream.installed_version(lib)
        why = upstream.version_problem(lib)
        if why:
            outside[lib] = why
    cuda = [{"name": torch.cuda.get_device_name(i),
             "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mode, why = hardware.precision()
    on_cpu = not cuda
    paths = {"bf16_autocast": {"active": on_cpu and mode == "bf16", "detail": why}}
    for name, patch in upstream.patches().items():
        problem = upstream.problem(name)
        cpu_only = name.startswith("cpu_")
        active = problem is None and (on_cpu or not cpu_only)
        detail = problem or (f"for {APPLIES.get(name, 'its case')}" if active else "CUDA present: the libraries' own path")
        paths[name] = {"active": active, "detail": f"{patch.what}; {detail}"}
    return {
        "versions": versions,
        "outside_tested_range": outside,
        "platform": platform.platform(),
        "cpu": {
            "model": info["model"],
            "capability": hardware.cpu_capability(),
            "detected_capability": hardware.detected_capability(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": [f for f in FLAGS if f in info["flags"]],
            "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "memory_gib": _memory_gib(),
        },
        "cuda_devices": cuda,
        "precision": {"mode": mode, "why": why},
        "fast_paths": paths,
        "environment": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def _memory_gib() -> dict:
    out = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out[key.removeprefix("Mem").lower()] = round(int(value.split()[0]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return out


def format_text(d: dict) -> str:
    cpu = d["cpu"]
    lines = ["lora_ft environment (paste this into a bug report)", ""]
    lines += [f"- {k}: {v or 'not installed'}" + (f"  [{d['outside_tested_range'][k]}]" if k in d["outside_tested_range"] else "")
              for k, v in d["versions"].items()]
    lines += [f"- platform: {d['platform']}", "",
              f"- CPU: {cpu['model']}",
              f"- CPU capability: {cpu['capability']}" + (f" (forced; detected {cpu['detected_capability']})"
                                                          if cpu["capability"] != cpu["detected_capability"] else ""),
              f"- torch CPU kernels: {cpu['torch_cpu_capability']}",
              f"- CPU flags: {' '.join(cpu['flags']) or '-'}",
              f"- cores: {cpu['cores']} ({cpu['usable_cores']} usable), torch threads: {cpu['torch_threads']}",
              f"- memory: {cpu['memory_gib'].get('total', '?')} GiB ({cpu['memory_gib'].get('available', '?')} GiB available)",
              "- CUDA devices: " + (", ".join(f"{c['name']} ({c['memory_gib']} GiB)" for c in d["cuda_devices"]) or "none"),
              "", f"- trains in: {d['precision']['mode']} ({d['precision']['why']})", "", "fast paths:"]
    lines += [f"- {name}: {'on ' if p['active'] else 'off'}  {p['detail']}" for name, p in d["fast_paths"].items()]
    if d["environment"]:
        lines += ["", "environment: " + " ".join(f"{k}={v}" for k, v in d["environment"].items())]
    return "\n".join(lines)


def main(as_json: bool) -> int:
    import json

    d = collect()
    sys.stdout.write((json.dumps(d, indent=2) if as_json else format_text(d)) + "\n")
    return 0
