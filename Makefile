# ppo-cli: `make demo` and `make test` work on a fresh machine; each installs what it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch first: installing the project on a machine without torch would otherwise pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-fast demo lint format bench clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	@$(PYTHON) -c "import ppo_cli, pytest, xdist, ruff, hypothesis" 2>/dev/null && $(PIP) show ppo-cli >/dev/null 2>&1 || $(PIP) install -e ".[dev]"

# Two workers: most test time is single-threaded start-up (imports) of the CLI runs under test.
test: install
	$(PYTHON) -m pytest -q -n 2

test-fast: install
	$(PYTHON) -m pytest -q -n 2 -m "not slow"

demo: install
	$(PYTHON) -m ppo_cli pipeline recipe=tiny

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: install
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

bench: install
	$(PYTHON) bench/run.py

clean:
	rm -rf outputs demo_runs bench/results .pytest_cache
