#!/usr/bin/env python
"""Train from a recipe. Same as `lora-ft train`, runnable under accelerate:

    accelerate launch scripts/sft.py recipes/gpt2_sentiment.yaml [--key value ...]
    python scripts/sft.py recipes/quickstart.yaml --num_train_epochs 2
"""

import sys

from lora_ft.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
