# dpo-dist: one command per use. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch goes in first and alone, so that no later requirement pulls a different (CUDA) build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

HARDWARE ?= gaudi2
CARDS ?= 8
RUN_DIR ?=
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

export DS_BUILD_OPS := 0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: help setup test demo clean

help:
	@echo "make demo                     full pipeline on the built-in tiny model (2 CPU ranks, ZeRO-3)"
	@echo "make test                     the test suite"
	@echo "make setup                    create $(VENV) with the pinned CPU/CUDA stack"

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	@# optimum-habana's sources, for the HPU adapter's signature test (it cannot import without Habana).
	$(PY) -m pip install -q --no-deps optimum-habana==1.21.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m dpo_dist.demo --out_dir $(DEMO_DIR)

clean:
	rm -rf runs/ .pytest_cache
