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
# The venv's tools (deepspeed, ninja) first, the same PATH the tests and the launcher use.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export TOKENIZERS_PARALLELISM := false
export HF_HUB_DISABLE_TELEMETRY := 1

IMAGE ?= dpo-dist:gaudi
NODE_CARDS ?= 8
DRY := $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run,)
LAUNCH := $(PY) -m launch

.PHONY: help setup test demo clean plan train-1x train-8x train-multinode sanity bench build run require-model

help:
	@echo "make demo                                  full pipeline on the built-in tiny model (2 CPU ranks, ZeRO-3)"
	@echo "make test                                  the test suite"
	@echo "make sanity MODEL=m [OUT_DIR=d]            1 card: SFT, DPO, merge, compare, generation test"
	@echo "make plan MODEL=m [HARDWARE=gaudi2 CARDS=8]   print the plan (memory per card, ZeRO stage, ...)"
	@echo "make train-1x|train-8x MODEL=m [DRY_RUN=1]    one node, 1 or 8 cards"
	@echo "make train-multinode HOSTFILE=f MODEL=m       several nodes from a DeepSpeed hostfile"
	@echo "make build | make run HF_TOKEN=...         the Gaudi Docker image"
	@echo "make bench                                 side-by-side benchmark against plain TRL"
	@echo "Extra dpo_dist.dpo flags: ARGS='--learning_rate 1e-6 ...'"

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	@# optimum-habana's sources, for the HPU adapter's signature test (it cannot import without Habana).
	$(PY) -m pip install -q --no-deps optimum-habana==1.21.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@# Build DeepSpeed's CPU comm op once, now, in one process: ranks that JIT-build it concurrently and get
	@# killed (timeouts, the dying-rank tests) can leave a stale build lock that blocks every later CPU run.
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()"
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m dpo_dist.pipeline --demo --out_dir $(DEMO_DIR)

require-model:
	@if [ -z "$(MODEL)" ]; then echo "error: MODEL is required (there are no default models), e.g. make $(MAKECMDGOALS) MODEL=google/gemma-3-270m" >&2; exit 2; fi

plan: require-model $(STAMP)
	$(LAUNCH) plan --model "$(MODEL)" --hardware $(HARDWARE) --cards $(CARDS) $(if $(HOSTFILE),--hostfile "$(HOSTFILE)",)

train-1x: require-model $(STAMP)
	$(LAUNCH) train --model "$(MODEL)" --hardware $(HARDWARE) --cards 1 $(if $(RUN_DIR),--run_dir "$(RUN_DIR)",) $(DRY) -- $(ARGS)

train-8x: require-model $(STAMP)
	$(LAUNCH) train --model "$(MODEL)" --hardware $(HARDWARE) --cards 8 $(if $(RUN_DIR),--run_dir "$(RUN_DIR)",) $(DRY) -- $(ARGS)

train-multinode: require-model $(STAMP)
	@if [ -z "$(HOSTFILE)" ]; then echo "error: HOSTFILE is required, e.g. HOSTFILE=hostfiles/gaudi_2x8.txt" >&2; exit 2; fi
	$(LAUNCH) train --model "$(MODEL)" --hardware $(HARDWARE) --cards $(NODE_CARDS) --hostfile "$(HOSTFILE)" $(if $(RUN_DIR),--run_dir "$(RUN_DIR)",) $(DRY) -- $(ARGS)

sanity: require-model $(STAMP)
	$(PY) -m dpo_dist.pipeline --model "$(MODEL)" --hardware $(HARDWARE) --cards 1 $(if $(OUT_DIR),--out_dir "$(OUT_DIR)",) $(if $(DATASET),--dataset_name "$(DATASET)",)

bench: $(STAMP)
	$(PY) -m bench.run

build:
	docker build -t $(IMAGE) .

run: export HF_TOKEN := $(HF_TOKEN)
run:
	@# The token reaches docker by name through the environment: never echoed, on a command line or in the image.
	@docker run -it --rm --runtime=habana -e HABANA_VISIBLE_DEVICES=all -e HF_TOKEN \
		--cap-add=sys_nice --net=host --ipc=host -v "$(CURDIR)":/workspace/dpo-dist $(IMAGE) bash

clean:
	rm -rf runs/ .pytest_cache
