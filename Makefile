# tether: `make demo` and `make test` are all a fresh checkout needs (python3 >= 3.11 and make).
# The first run creates $(VENV) and installs the package with its dev extra.

# PYTHON defaults to the first of python3.13/3.12/3.11/python3 that runs and is >= 3.11.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell for p in python3.13 python3.12 python3.11 python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 \
	&& { echo $$p; break; }; done)
endif
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: all demo test bench lint clean

all: test

# Re-run when pyproject.toml changes (or the venv is deleted).
$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "error: need python3 >= 3.11 on PATH (or PYTHON=...)" >&2; exit 1; fi
	@echo "creating $(VENV) with $(PYTHON) ($$($(PYTHON) --version 2>&1))"
	$(PYTHON) -m venv $(VENV) || { echo "error: '$(PYTHON) -m venv' failed; on Debian: apt-get install python3-venv" >&2; exit 1; }
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/tether demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/tether bench

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples
	$(VENV)/bin/ruff format --check src tests examples
	$(VENV)/bin/mypy --strict

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
