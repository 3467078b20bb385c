# The README's two quick-start commands: `make demo` and `make test`.
#
#   make demo                                  # .venv; pip install torch==2.13.0 if it has none
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu  # torch from the CPU-only index
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cu128    # a CUDA 12.8 build
#   make demo VENV=/path/to/venv TORCH=        # an existing venv, keeping the torch it has
#
# TORCH is the requirement `pip install` gets for torch, and only when the venv cannot
# `import torch` yet (TORCH or TORCH_INDEX given on the command line: even then); TORCH= (empty)
# never installs torch. TORCH_INDEX, if set, is the index pip takes it from (--index-url).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
OUT ?= out/demo
BIN := $(VENV)/bin

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@if [ -z "$(strip $(TORCH))" ]; then \
	  echo "TORCH is empty: keeping the torch in $(VENV) (if any)"; \
	elif [ "$(origin TORCH)" != "command line" ] && [ "$(origin TORCH_INDEX)" != "command line" ] \
	    && $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "keeping torch $$($(BIN)/python -c 'import torch; print(torch.__version__)') in $(VENV)"; \
	else \
	  echo "pip install $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))"; \
	  $(BIN)/pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)"); \
	fi
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
