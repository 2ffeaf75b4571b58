# Two entry points, both self-installing into ./.venv:
#   make demo   the main job on the embedded default data in data/
#   make test   the whole test suite
# Install torch first so the project's "torch>=2.1" is already met: on this machine kind,
# torch==2.13.0 is a local CPU build (a bare `torch` would pull a multi-GB CUDA build).
# Elsewhere: make test TORCH=torch
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
DATA ?= data/fashion-mnist
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,plot]"
	touch $@

demo: $(STAMP)
	$(BIN)/logitguard inspect $(DATA)

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
