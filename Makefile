# dpo-dist: one command per use. `make help` lists them.
SHELL := /bin/bash
# Make variables are data, never code. A variable given on the command line or in the environment is recursive, so
# make would run a `$(shell ...)` in it at every use: each one is first replaced by its literal text ($(value)). The
# recipes then hand every value to the shell as one single-quoted word ($(call sq,...): `$(...)`, backticks, `;` and
# quotes are plain characters there), and ARGS / PYTEST_ARGS, which are lists of words, through the environment to
# Python's shlex (launch/rank_args.py, PYTEST_ADDOPTS): no shell ever reads them.
USER_VARS := MODEL MODEL_NAME HARDWARE CARDS NODE_CARDS HOSTFILE RUN_DIR DRY_RUN ARGS DATASET DATASET_COLUMNS CHAT_TEMPLATE \
	OUT_DIR DEMO_DIR IMAGE RECIPE TB_PORT \
	PYTEST_ARGS HF_TOKEN PYTHON TORCH_SPEC
GIVEN_VARS := $(foreach v,$(sort $(USER_VARS) $(.VARIABLES)),$(if $(filter command line environment environment override,$(origin $(v))),$(if $(filter $(v),$(USER_VARS)) $(filter command line,$(origin $(v))),$(v))))
$(foreach v,$(GIVEN_VARS),$(eval override $(v) := $$(value $(v))))
# A line break would end the recipe line inside a quoted word: refused.
define LINE_BREAK


endef
$(foreach v,$(GIVEN_VARS),$(if $(findstring $(LINE_BREAK),$($(v))),$(error $(v) holds a line break; make variables are one line. Fix: give $(v) without it)))
sq = '$(subst ','\'',$(1))'
export ARGS PYTEST_ARGS

PYTHON ?= python3
VENV := .venv
# torch goes in first and alone, so that no later requirement pulls a different (CUDA) build: requirements.txt's
# torch line (override TORCH_SPEC for another build of the same version).
TORCH_SPEC ?= $(shell sed -n 's/^\(torch==[^ #]*\).*/\1/p' requirements.txt)
# Inside the Habana image (it ships habana_frameworks and the Gaudi pins, see Dockerfile) make uses the image's
# python and installs nothing: a .venv would hide habana_frameworks, and pip must never replace the image's torch.
IN_GAUDI_IMAGE := $(shell $(call sq,$(PYTHON)) -c "import importlib.util as u, sys; sys.exit(u.find_spec('habana_frameworks') is None)" 2>/dev/null && echo 1)
ifeq ($(IN_GAUDI_IMAGE),1)
PY := $(call sq,$(PYTHON))
STAMP := image-python
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
endif
# The Gaudi twin: optimum-habana's real code on CPU, with the Gaudi pins (tests; see README, "The Gaudi twin").
TWIN_VENV := .venv-gaudi
TWIN_STAMP := $(TWIN_VENV)/.installed

HARDWARE ?= gaudi2
CARDS ?= 8
RUN_DIR ?=
DEMO_DIR ?= runs/demo
RECIPE ?=
TB_PORT ?= 6006
PYTEST_ARGS ?=

export DS_BUILD_OPS := 0
# The venv's tools (deepspeed, ninja) first, the same PATH the tests and the launcher use (not in the Habana image,
# where a host .venv mounted into the container must not shadow the image's own tools).
ifneq ($(IN_GAUDI_IMAGE),1)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
endif
export TOKENIZERS_PARALLELISM := false
export HF_HUB_DISABLE_TELEMETRY := 1

IMAGE ?= dpo-dist:gaudi
NODE_CARDS ?= 8
# MODEL_NAME is the seed's name for MODEL (its README: `make sanity MODEL_NAME=...`); require-model refuses two
# different values.
override MODEL := $(or $(MODEL),$(MODEL_NAME))
MODEL_TARGETS := plan train-1x train-8x train-multinode sanity
DRY := $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run,)
LAUNCH := $(PY) -m launch
# The training targets: `python -m launch` with the words of ARGS appended (launch/rank_args.py splits them).
LAUNCH_WITH_ARGS := $(PY) -m launch.rank_args
# RECIPE=recipes/<hardware>/<model>-<lora|full>.yaml (make recipes): the launcher plans with its choices.
RECIPE_FLAG = $(if $(RECIPE),--recipe $(call sq,$(RECIPE)),)

.PHONY: help setup setup-gaudi-twin test check lint demo clean plan train-1x train-8x train-multinode sanity bench bench-planner build run \
	require-model gaudi-selfcheck tensorboard recipes

help:
	@echo "make demo                                  full pipeline on the built-in tiny model (2 CPU ranks, ZeRO-3)"
	@echo "make test                                  the test suite (unit tests and multi-process runs, CI)"
	@echo "make check                                 unit tests only (no multi-process runs): the fast loop"
	@echo "make lint                                  ruff (pyproject.toml), zero findings"
	@echo "make sanity MODEL=m [OUT_DIR=d]            1 card: SFT, DPO, merge, compare, generation test"
	@echo "  [DATASET=d DATASET_COLUMNS=prompt=q,chosen=a,rejected=b CHAT_TEMPLATE=llama3]   the data and its chat template"
	@echo "make plan MODEL=m [HARDWARE=gaudi2 CARDS=8]   print the plan (memory per card, ZeRO stage, ...)"
	@echo "make train-1x|train-8x MODEL=m [DRY_RUN=1]    one node, 1 or 8 cards"
	@echo "make train-multinode HOSTFILE=f MODEL=m       several nodes from a DeepSpeed hostfile"
	@echo "make build | make run HF_TOKEN=...         the Gaudi Docker image"
	@echo "  [RECIPE=recipes/gaudi2/llama-3-70b-lora.yaml]   a generated recipe (make recipes; ARGS= flags still win)"
	@echo "make tensorboard RUN_DIR=d [TB_PORT=6006]  serve the TensorBoard event files of a run (--report_to tensorboard)"
	@echo "make recipes                               regenerate recipes/<hardware>/*.yaml from the planner"
	@echo "make bench                                 side-by-side benchmark against plain TRL"
	@echo "make bench-planner                         CPU memory planner vs measured peak RSS: runs, fit, plot"
	@echo "make gaudi-selfcheck                       on a Gaudi node: doctor, short runs, figures -> selfcheck.md"
	@echo "make setup-gaudi-twin                      the Gaudi twin venv (.venv-gaudi): optimum-habana on CPU, for tests"
	@echo "Extra dpo_dist.dpo flags: ARGS='--learning_rate 1e-6 ...'"

setup: $(STAMP)

ifeq ($(IN_GAUDI_IMAGE),1)
# In the Habana image the environment is the image's (Dockerfile): nothing to install.
.PHONY: image-python
image-python: ;
else
$(STAMP): requirements.txt requirements-gaudi.txt pyproject.toml
	@test -x $(PY) || $(call sq,$(PYTHON)) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(call sq,$(TORCH_SPEC))
	$(PY) -m pip install -q -r requirements.txt
	@# optimum-habana's sources, for the HPU adapter's signature test (it cannot import without Habana).
	$(PY) -m pip install -q --no-deps "$$(grep -m1 '^optimum-habana==' requirements-gaudi.txt)"
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@# Build DeepSpeed's CPU comm op once, now, in one process: ranks that JIT-build it concurrently and get
	@# killed (timeouts, the dying-rank tests) can leave a stale build lock that blocks every later CPU run.
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()"
	@touch $@
endif

setup-gaudi-twin: $(TWIN_STAMP)

# The Gaudi pins (requirements-gaudi.txt) on a CPU torch: the registry has no CPU build of the Habana image's
# torch (2.10 with Intel Gaudi software 1.24), so the twin uses the same CPU torch as .venv. No DeepSpeed:
# optimum-habana refuses any DeepSpeed but Habana's fork off an HPU, so the twin runs DDP plans (gaudi_spawn
# --use_mpi, with Debian's Open MPI). habana_frameworks itself is a test-only stand-in (tests/support/habana_shim).
$(TWIN_STAMP): requirements-gaudi.txt pyproject.toml
	@test -x $(TWIN_VENV)/bin/python || $(call sq,$(PYTHON)) -m venv $(TWIN_VENV)
	$(TWIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(TWIN_VENV)/bin/python -m pip install -q $(call sq,$(TORCH_SPEC))
	$(TWIN_VENV)/bin/python -m pip install -q -r requirements-gaudi.txt
	$(TWIN_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	@.ci/openmpi_setup.sh
	@touch $@

# PYTEST_ARGS: pytest splits PYTEST_ADDOPTS into words itself (shlex).
test: $(STAMP) $(if $(IN_GAUDI_IMAGE),,$(TWIN_STAMP))
	PYTEST_ADDOPTS="$${PYTEST_ADDOPTS:+$$PYTEST_ADDOPTS }$$PYTEST_ARGS" $(PY) -m pytest -q

# The fast loop: unit tests only (no multi-process runs, no twin venv): tests/ without tests/e2e/.
check: $(STAMP)
	PYTEST_ADDOPTS="$${PYTEST_ADDOPTS:+$$PYTEST_ADDOPTS }$$PYTEST_ARGS" $(PY) -m pytest -q --ignore=tests/e2e

# ruff, configured in pyproject.toml: zero findings.
lint: $(STAMP)
	$(PY) -m ruff check dpo_dist launch tests bench

demo: $(STAMP)
	$(PY) -m dpo_dist.pipeline --demo --out_dir $(call sq,$(DEMO_DIR))

require-model:
	@if [ -z $(call sq,$(MODEL)) ]; then echo "error: MODEL is required (there are no default models), e.g. make $(firstword $(filter $(MODEL_TARGETS),$(MAKECMDGOALS)) plan) MODEL=google/gemma-3-270m" >&2; exit 2; fi
	@if [ -n $(call sq,$(MODEL_NAME)) ] && [ $(call sq,$(MODEL)) != $(call sq,$(MODEL_NAME)) ]; then printf 'error: MODEL=%s and MODEL_NAME=%s differ (MODEL_NAME is another name for MODEL, as in the seed scripts). Fix: give only one of them.\n' $(call sq,$(MODEL)) $(call sq,$(MODEL_NAME)) >&2; exit 2; fi

plan: require-model $(STAMP)
	$(LAUNCH) plan --model $(call sq,$(MODEL)) --hardware $(call sq,$(HARDWARE)) --cards $(call sq,$(CARDS)) $(if $(HOSTFILE),--hostfile $(call sq,$(HOSTFILE)),)

train-1x: require-model $(STAMP)
	$(LAUNCH_WITH_ARGS) train --model $(call sq,$(MODEL)) --hardware $(call sq,$(HARDWARE)) --cards 1 $(if $(RUN_DIR),--run_dir $(call sq,$(RUN_DIR)),) $(RECIPE_FLAG) $(DRY) --

train-8x: require-model $(STAMP)
	$(LAUNCH_WITH_ARGS) train --model $(call sq,$(MODEL)) --hardware $(call sq,$(HARDWARE)) --cards 8 $(if $(RUN_DIR),--run_dir $(call sq,$(RUN_DIR)),) $(RECIPE_FLAG) $(DRY) --

train-multinode: require-model $(STAMP)
	@if [ -z $(call sq,$(HOSTFILE)) ]; then echo "error: HOSTFILE is required, e.g. HOSTFILE=hostfiles/gaudi_2x8.txt" >&2; exit 2; fi
	$(LAUNCH_WITH_ARGS) train --model $(call sq,$(MODEL)) --hardware $(call sq,$(HARDWARE)) --cards $(call sq,$(NODE_CARDS)) --hostfile $(call sq,$(HOSTFILE)) $(if $(RUN_DIR),--run_dir $(call sq,$(RUN_DIR)),) $(RECIPE_FLAG) $(DRY) --

sanity: require-model $(STAMP)
	$(PY) -m dpo_dist.pipeline --model $(call sq,$(MODEL)) --hardware $(call sq,$(HARDWARE)) --cards 1 $(if $(OUT_DIR),--out_dir $(call sq,$(OUT_DIR)),) $(if $(DATASET),--dataset_name $(call sq,$(DATASET)),) $(if $(DATASET_COLUMNS),--dataset_columns $(call sq,$(DATASET_COLUMNS)),) $(if $(CHAT_TEMPLATE),--chat_template $(call sq,$(CHAT_TEMPLATE)),)

bench: $(STAMP)
	$(PY) -m bench.run

bench-planner: $(STAMP)
	$(PY) -m bench.planner

# TensorBoard over a run's event files (--report_to tensorboard writes them under <output_dir>/runs/; the
# comparison's go under runs/compare beside its results): every run below RUN_DIR.
tensorboard: $(STAMP)
	@if [ -z $(call sq,$(RUN_DIR)) ]; then echo "error: RUN_DIR is required, e.g. make tensorboard RUN_DIR=runs/demo" >&2; exit 2; fi
	$(PY) -m tensorboard.main --logdir $(call sq,$(RUN_DIR)) --port $(call sq,$(TB_PORT))

# recipes/<hardware>/<model>-<lora|full>[-<N>cards].yaml from the planner (launch/recipes.py); commit the result.
recipes: $(STAMP)
	$(LAUNCH) recipes --write

gaudi-selfcheck: $(STAMP)
	$(PY) -m launch selfcheck $(if $(HARDWARE),--hardware $(call sq,$(HARDWARE)),) $(if $(OUT_DIR),--out_dir $(call sq,$(OUT_DIR)),)

build:
	docker build -t $(call sq,$(IMAGE)) .

run: export HF_TOKEN := $(HF_TOKEN)
run:
	@# The token reaches docker by name through the environment: never echoed, on a command line or in the image.
	@# OMPI_MCA_btl_vader_single_copy_mechanism=none: Open MPI's shared-memory transport needs it in a container
	@# (ZeRO-0 plans start their ranks with mpirun), as Habana's own docker run lines set it.
	@docker run -it --rm --runtime=habana -e HABANA_VISIBLE_DEVICES=all -e HF_TOKEN \
		-e OMPI_MCA_btl_vader_single_copy_mechanism=none \
		$(if $(MODEL),-e MODEL=$(call sq,$(MODEL)) -e MODEL_NAME=$(call sq,$(MODEL)),) \
		--cap-add=sys_nice --net=host --ipc=host -v $(call sq,$(CURDIR)):/workspace/dpo-dist $(call sq,$(IMAGE)) bash

clean:
	rm -rf runs/ .pytest_cache
