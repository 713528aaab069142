# The pipeline graph. Each stage is a numbered notebook run headless by papermill; it counts as
# done only when its last cell wrote results/<scale>/<stage>/DONE.
#   make reproduce                 # every stage at SCALE=default
#   make smoke                     # every stage at SCALE=smoke (minutes)
#   make stage STAGE=00_build_world SCALE=smoke OVERRIDES='["world.seed=1"]'
SHELL := /bin/bash
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help

SCALE ?= default
# Extra Hydra overrides, a YAML list, e.g. OVERRIDES='["seed=1", "world.image_size=64"]'
OVERRIDES ?= []
# Per-cell papermill timeout in seconds.
TIMEOUT ?= 3600

VENV := .venv
PY := $(VENV)/bin/python
KERNEL := fire-core
ENV_STAMP := $(VENV)/.env-stamp
RESULTS_ROOT ?= results
RESULTS := $(RESULTS_ROOT)/$(SCALE)

# Stages in pipeline order; each depends on the one before it. Adding a stage means adding a
# notebook named <stage>.ipynb and its name here.
STAGES := 00_build_world 01_train_base_vlm 02_generate_fire100k 03_train_teacher 04_train_student 05_simulate_fire1m 06_fire_bench

# Keep every cache and runtime file inside the repository, and never reach a model hub.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HOME := $(CURDIR)/.cache/huggingface
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export JUPYTER_RUNTIME_DIR := $(CURDIR)/.cache/jupyter-runtime
export JUPYTER_PATH := $(CURDIR)/$(VENV)/share/jupyter
export PYTHONHASHSEED := 0

.PHONY: help env reproduce smoke stage test test-fast lint bench clean clean-all

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'
	@echo "  variables: SCALE=smoke|default|paper (now $(SCALE)), OVERRIDES='[...]', STAGE=<name>"
	@echo "  stages: $(STAGES)"

env: $(ENV_STAMP) ## Build .venv and its Jupyter kernel (idempotent)

$(ENV_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e .
	$(PY) -m ipykernel install --prefix $(CURDIR)/$(VENV) --name $(KERNEL) --display-name "Python (fire-core)"
	touch $@

# One rule per stage: run the notebook, keep the executed copy beside the stage's outputs.
define stage_rule
$(RESULTS)/$(1)/DONE: notebooks/$(1).ipynb $(2) | $(ENV_STAMP)
	@mkdir -p $(RESULTS)/$(1)
	rm -f $$@
	$(PY) -m papermill notebooks/$(1).ipynb $(RESULTS)/$(1)/$(1).ipynb \
		--kernel $(KERNEL) --cwd $(CURDIR) --execution-timeout $(TIMEOUT) \
		-p scale $(SCALE) -y 'overrides: $(OVERRIDES)' \
		-p results_root $(abspath $(RESULTS_ROOT)) --progress-bar
	@test -f $$@ || (echo "stage $(1) finished without writing its DONE marker" >&2; exit 1)
endef
$(foreach s,$(STAGES),$(eval $(call stage_rule,$(s),$(if $(prev),$(RESULTS)/$(prev)/DONE)))$(eval prev := $(s)))

reproduce: $(RESULTS)/$(lastword $(STAGES))/DONE ## Run every stage at SCALE (default: default)

smoke: ## Run every stage at SCALE=smoke
	$(MAKE) reproduce SCALE=smoke

stage: $(RESULTS)/$(STAGE)/DONE ## Run one stage (and the ones it needs): STAGE=<name>

test: $(ENV_STAMP) ## Build the env if needed, then run every test (includes the smoke pipeline)
	$(PY) -m pytest tests -q

test-fast: $(ENV_STAMP) ## Unit tests only (skip the papermill runs)
	$(PY) -m pytest tests -q -m "not slow"

lint: $(ENV_STAMP) ## ruff over the package, tests and notebooks
	$(PY) -m ruff check fire_core tests notebooks

bench: $(ENV_STAMP) ## Benchmarks; JSON under results/bench/
	$(PY) -m fire_core.bench

clean: ## Remove results of SCALE
	rm -rf $(RESULTS)

clean-all: ## Remove every result, the env and caches
	rm -rf results/* .venv .cache
