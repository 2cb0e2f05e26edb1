"""REST serving: `lora-ft serve`."""
