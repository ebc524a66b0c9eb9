# Two commands matter: `make serve` (a local cluster serving a model) and `make test` (the whole suite).
# Both create .venv on first use. torch is installed first and pinned, so pip keeps the CPU build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.meshllm-installed
TORCH ?= torch==2.13.0
# ggml-python builds ggml at install; with llama.cpp's tiled mat-muls for prompts (GGML_LLAMAFILE, which
# standalone ggml leaves off) the ggml engine prefills 2-3x faster
GGML_PYTHON ?= ggml-python==0.0.45
GGML_CMAKE_ARGS ?= -DGGML_LLAMAFILE=ON
MODEL ?= demo
STAGES ?= 2
PORT ?= 8100
ENGINE ?=

.PHONY: setup serve test lint proto clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -c "import ggml, sys; sys.exit(not ggml.ggml_cpu_has_llamafile())" 2>/dev/null \
		|| CMAKE_ARGS="$(GGML_CMAKE_ARGS)" $(BIN)/python -m pip install -q --force-reinstall --no-deps \
			--no-cache-dir "$(GGML_PYTHON)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/meshllm serve --model $(MODEL) --stages $(STAGES) --port $(PORT) $(if $(ENGINE),--engine $(ENGINE))

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

proto: $(STAMP)
	$(BIN)/python -m meshllm.transport.proto.generate

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
