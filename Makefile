# tessera: `make demo` trains a tiny model on the built-in data and decodes from it;
# `make test` runs the test suite (`make test-fast`: without the `slow` end-to-end tests).
# Both create .venv on first use.

PYTHON ?= $(shell for p in python3.12 "$$HOME/.pyenv/versions/3.12.1/bin/python3" \
	$$(ls -d $$HOME/.pyenv/versions/3.12*/bin/python3 2>/dev/null) python3; do \
	command -v "$$p" >/dev/null 2>&1 && "$$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo "$$p"; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?= -n 2
# libtpu (the tpu extra) exists for Linux x86-64 only; with it, tests compile for TPU topologies.
comma := ,
PLATFORM := $(shell uname -s)-$(shell uname -m)
EXTRAS := dev,seqio$(if $(filter Linux-x86_64,$(PLATFORM)),$(comma)tpu)

.PHONY: demo test test-fast install lint lock clean

# requirements.lock pins the versions tested on CPython 3.12, Linux x86-64 (tools/lock.py writes it
# and names the same target). There .venv gets exactly those, plus a copy of the lock that tells
# tests/test_lock.py to check them; elsewhere pip picks the newest versions that fit.
LOCK_TARGET := cpython-312 linux-x86_64

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@rm -f $(VENV)/requirements.lock
	@if [ "$$($(BIN)/python -c 'import sys, sysconfig as s; print(sys.implementation.cache_tag, s.get_platform())')" \
		= "$(LOCK_TARGET)" ]; then \
		set -x && $(BIN)/python -m pip install --quiet -r requirements.lock \
		&& $(BIN)/python -m pip install --quiet --no-deps -e ".[$(EXTRAS)]" \
		&& cp requirements.lock $(VENV)/requirements.lock; \
	else \
		echo "requirements.lock applies to CPython 3.12 on Linux x86-64 only: installing unpinned"; \
		set -x && $(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"; \
	fi
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tessera.train --config=llama:tiny --workdir=$(DEMO_DIR)
	$(BIN)/python -m tessera.serve.decode --config=llama:tiny --workdir=$(DEMO_DIR) --eval_synthetic=64

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check tessera tests tools

# Rewrites requirements.lock from .venv (after upgrading it and passing make test).
lock: $(STAMP)
	$(BIN)/python tools/lock.py

clean:
	rm -rf $(VENV) runs
