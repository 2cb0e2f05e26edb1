"""CPU kernels and memory adjustments, each a guarded patch of an upstream internal (see lora_ft/upstream.py)."""
