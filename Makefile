# The README's two quick-start commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch by default (no multi-GB CUDA download); override for your GPU machine.
TORCH ?= torch==2.13.0
OUT ?= out/demo
BIN := $(VENV)/bin

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

.PHONY: setup demo test lint
setup: $(VENV)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/catpatch demo --out $(OUT)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q
	$(BIN)/ruff check catpatch tests examples

lint: setup
	$(BIN)/ruff check catpatch tests examples
