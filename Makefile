# tether: `make demo` and `make test` are all a fresh checkout needs (python3 >= 3.11 and make).
# The first run creates $(VENV) and installs the package with its dev extra; `make test` also
# installs Debian's chromium (apt-get, as root or through sudo) when /usr/bin/chromium is missing.

# PYTHON defaults to the first of python3.13/3.12/3.11/python3 that runs and is >= 3.11.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell for p in python3.13 python3.12 python3.11 python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 \
	&& { echo $$p; break; }; done)
endif
VENV := .venv
STAMP := $(VENV)/.installed
# make fuzz: seconds per atheris harness, live sessions per server and the time bound on them.
FUZZ_SECONDS ?= 60
FUZZ_SESSIONS ?= 100000
FUZZ_LIVE_SECONDS ?= 900
FUZZ_DIR := .fuzz
# The browser tests drive Debian's Chromium (Playwright's own browser download is not used).
CHROMIUM ?= /usr/bin/chromium

.PHONY: all demo test bench lint fuzz clean chromium nats-server

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

test: $(STAMP) chromium nats-server
	$(VENV)/bin/python -m pytest -q

# Install Debian's chromium package when $(CHROMIUM) is missing: as root, or through sudo.
# apt-get update only when the first install fails (a fresh machine has no package lists).
chromium:
	@if [ ! -x "$(CHROMIUM)" ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; \
		elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
		else echo "error: $(CHROMIUM) is missing and the browser tests need it; as root run:" \
			"apt-get install -y chromium (no sudo here to do it)" >&2; exit 1; fi; \
		echo "installing Debian's chromium for the browser tests ($(CHROMIUM) is missing)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		$$SUDO apt-get install -y -q chromium \
		|| { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; } \
		|| { echo "error: could not install chromium with apt-get" >&2; exit 1; }; \
		[ -x "$(CHROMIUM)" ] || { echo "error: chromium installed but $(CHROMIUM) is missing" >&2; exit 1; }; \
	fi

# The NATS tests run a real nats-server (Debian's nats-server package): installed the same way
# when it is missing (the tests fail, not skip, without it).
nats-server:
	@if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; \
		elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
		else echo "error: nats-server is missing and the NATS tests need it; as root run:" \
			"apt-get install -y nats-server (no sudo here to do it)" >&2; exit 1; fi; \
		echo "installing Debian's nats-server for the NATS tests"; \
		export DEBIAN_FRONTEND=noninteractive; \
		$$SUDO apt-get install -y -q nats-server \
		|| { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q nats-server; } \
		|| { echo "error: could not install nats-server with apt-get" >&2; exit 1; }; \
	fi

bench: $(STAMP)
	$(VENV)/bin/tether bench

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples fuzz
	$(VENV)/bin/ruff format --check src tests examples fuzz
	$(VENV)/bin/mypy --strict

# Each atheris harness for FUZZ_SECONDS from the committed seeds (fuzz/corpus/; what it finds
# new goes to $(FUZZ_DIR)/, a crashing input too), then FUZZ_SESSIONS hostile live sessions
# against a listening asyncio Main and against a blocking peer (fuzz/live.py). Fails on any
# finding. Not part of `make test`, which runs all of it briefly.
# Every stage runs even if an earlier one found something; the exit status is 1 if any did.
fuzz: $(STAMP)
	@mkdir -p $(FUZZ_DIR)/fuzz_protocol $(FUZZ_DIR)/fuzz_registry
	@rc=0; for h in fuzz_protocol fuzz_registry; do \
		echo "== $$h: $(FUZZ_SECONDS) s from fuzz/corpus/$$h"; \
		$(VENV)/bin/python fuzz/$$h.py -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
			-artifact_prefix=$(FUZZ_DIR)/ $(FUZZ_DIR)/$$h fuzz/corpus/$$h \
			|| { rc=1; echo "== $$h FOUND A FAILURE (input saved under $(FUZZ_DIR)/)"; }; \
	done; \
	echo "== live: $(FUZZ_SESSIONS) sessions per server (at most $(FUZZ_LIVE_SECONDS) s each)"; \
	$(VENV)/bin/python fuzz/live.py --sessions $(FUZZ_SESSIONS) \
		--max-seconds $(FUZZ_LIVE_SECONDS) || rc=1; \
	exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(FUZZ_DIR)
