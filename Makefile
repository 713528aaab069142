# The pipeline graph. Each stage is a numbered notebook run headless by papermill; it counts as
# done only when its last cell wrote results/<run>/<stage>/DONE.
#   make reproduce                 # every stage at SCALE=default -> results/default/
#   make smoke                     # every stage at SCALE=smoke (minutes) -> results/smoke/
#   make stage STAGE=00_build_world SCALE=smoke OVERRIDES='["seed=1"]'   # -> results/smoke-<hash>/
# A run with overrides gets its own folder, <scale>-<first 8 hex of sha256 of the overrides>, or
# RUN=<name>. Before make looks at any stage, `python -m fire_core.pipeline plan` marks stages made
# from another config as stale (they rerun) and links stages that another run finished with the
# same config (they are reused).
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
empty :=
space := $(empty) $(empty)
OVERRIDES_KEY := $(subst $(space),,$(strip $(OVERRIDES)))
ifeq ($(origin RUN),undefined)
RUN := $(if $(filter [],$(OVERRIDES_KEY)),$(SCALE),$(SCALE)-$(shell printf '%s' '$(OVERRIDES_KEY)' | sha256sum | cut -c1-8))
endif
RESULTS := $(RESULTS_ROOT)/$(RUN)
PLAN = $(PY) -m fire_core.pipeline plan --results-root $(abspath $(RESULTS_ROOT)) --run $(RUN) \
	--overrides '$(OVERRIDES)' $(SCALE)

# Stages in pipeline order; each depends on the one before it. Adding a stage means adding a
# notebook named <stage>.ipynb and its name here.
STAGES := 00_build_world 01_train_base_vlm 02_generate_fire100k 03_train_teacher 04_train_student 05_simulate_fire1m 06_fire_bench 07_train_dress 08_make_figures

# Keep every cache and runtime file inside the repository, and never reach a model hub.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HOME := $(CURDIR)/.cache/huggingface
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export JUPYTER_RUNTIME_DIR := $(CURDIR)/.cache/jupyter-runtime
export JUPYTER_PATH := $(CURDIR)/$(VENV)/share/jupyter
export PYTHONHASHSEED := 0
# Same inputs, same bytes: MKL keeps one code path and thread split whatever the data's memory
# alignment and the machine's load (fire_core/__init__.py sets the same for other entry points).
export MKL_CBWR := AUTO,STRICT
export MKL_DYNAMIC := FALSE
export OMP_DYNAMIC := FALSE

.PHONY: help env plan reproduce smoke stage test test-fast lint bench audit report report-check figures clean clean-all

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'
	@echo "  variables: SCALE=smoke|default|paper (now $(SCALE)), OVERRIDES='[...]', STAGE=<name>,"
	@echo "             RUN=<folder under $(RESULTS_ROOT)/> (now $(RUN))"
	@echo "  stages: $(STAGES)"

env: $(ENV_STAMP) ## Build .venv and its Jupyter kernel (idempotent)

$(ENV_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e .
	$(PY) -m ipykernel install --prefix $(CURDIR)/$(VENV) --name $(KERNEL) --display-name "Python (fire-core)"
	@# headless Chromium renders the report in make report-check and its test; best effort, never fatal
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq chromium >/dev/null 2>&1; } || \
		echo "note: headless Chromium could not be installed (apt-get as root); the report check will only check links"
	touch $@

# One rule per stage: run the notebook, keep the executed copy beside the stage's outputs.
define stage_rule
$(RESULTS)/$(1)/DONE: notebooks/$(1).ipynb $(2) | $(ENV_STAMP)
	@# a stage reused from another run is a link; a rerun gets a folder of its own
	@if [ -L $(RESULTS)/$(1) ]; then rm $(RESULTS)/$(1); fi
	@mkdir -p $(RESULTS)/$(1)
	rm -f $$@
	$(PY) -m papermill notebooks/$(1).ipynb $(RESULTS)/$(1)/$(1).ipynb \
		--kernel $(KERNEL) --cwd $(CURDIR) --execution-timeout $(TIMEOUT) \
		-p scale $(SCALE) -p run_id $(RUN) -y 'overrides: $(OVERRIDES)' \
		-p results_root $(abspath $(RESULTS_ROOT)) --progress-bar
	@test -f $$@ || (echo "stage $(1) finished without writing its DONE marker" >&2; exit 1)
endef
$(foreach s,$(STAGES),$(eval $(call stage_rule,$(s),$(if $(prev),$(RESULTS)/$(prev)/DONE)))$(eval prev := $(s)))

plan: $(ENV_STAMP) ## Show which stages are done, reused, stale or to run (marks stale ones)
	$(PLAN) --upto $(if $(STAGE),$(STAGE),$(lastword $(STAGES)))

# make stats DONE files only after the plan has run, so the plan and the stages run in two steps
reproduce: $(ENV_STAMP) ## Run every stage at SCALE (default: default); reruns stale stages; then the report
	$(PLAN)
	$(MAKE) --no-print-directory $(RESULTS)/$(lastword $(STAGES))/DONE RUN=$(RUN)
	$(PY) -m fire_core.report $(RESULTS)

smoke: ## Run every stage at SCALE=smoke
	$(MAKE) reproduce SCALE=smoke

stage: $(ENV_STAMP) ## Run one stage (and the ones it needs): STAGE=<name>
	@test -n "$(STAGE)" || (echo "name a stage: make stage STAGE=<name>; stages: $(STAGES)" >&2; exit 2)
	$(PLAN) --upto $(STAGE)
	$(MAKE) --no-print-directory $(RESULTS)/$(STAGE)/DONE RUN=$(RUN)

test: $(ENV_STAMP) ## Build the env if needed, then run every test (includes the smoke pipeline)
	$(PY) -m pytest tests -q --durations=12  # the slowest twelve, to watch the 12-minute budget

test-fast: $(ENV_STAMP) ## Unit tests only (skip the papermill runs)
	$(PY) -m pytest tests -q -m "not slow"

lint: $(ENV_STAMP) ## ruff over the package, tests and notebooks
	$(PY) -m ruff check fire_core tests notebooks

bench: $(ENV_STAMP) ## Benchmarks; JSON under results/bench/
	$(PY) -m fire_core.bench

audit: $(ENV_STAMP) ## Check one run: hashes, figure sources, commits, numbers recomputed (STRICT=1: warnings fail)
	$(PY) -m fire_core.audit $(RESULTS) $(if $(STRICT),--strict)

report: $(ENV_STAMP) ## Write $(RESULTS)/report/index.html from the run's results (opens from disk)
	$(PY) -m fire_core.report $(RESULTS)

report-check: $(ENV_STAMP) ## The report, then check its links and images (rendered in headless Chromium where installed)
	$(PY) -m fire_core.report $(RESULTS) --check

figures: $(ENV_STAMP) ## Stage 08 alone on existing results (figures and tables), then the report
	$(MAKE) --no-print-directory stage STAGE=08_make_figures
	$(PY) -m fire_core.report $(RESULTS)

clean: ## Remove the results of one run (SCALE, OVERRIDES or RUN name it)
	rm -rf $(RESULTS)

clean-all: ## Remove every result, the env and caches
	rm -rf results/* .venv .cache
