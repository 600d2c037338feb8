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
EXTRAS := dev$(if $(filter Linux-x86_64,$(PLATFORM)),$(comma)tpu)

.PHONY: demo test test-fast install lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
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

clean:
	rm -rf $(VENV) runs
