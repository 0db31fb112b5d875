# zh-align — every stage is `mlflow run . -e <stage>` with the profile, the dry-run switch and overrides.
# DRY_RUN=1 (the default) prints the plan into the experiment $(EXPERIMENT)-dryrun; DRY_RUN=0 runs for real.

DRY_RUN ?= 1
HW ?= 4090
EXPERIMENT ?= zh-align
ENV_MANAGER ?= local
SET ?=
# make demo's model: 2 tiny random layers on Qwen2.5's real tokenizer and vocabulary (tiny-qwen2: half the time)
DEMO_MODEL ?= tiny-qwen2.5
LOSS ?= orpo
PORT ?= 5000
HOST ?= 127.0.0.1
DB ?=
CONFIG ?=
ROWS ?= 1000000
ACCEL ?=
MODEL ?=
VERSION ?=
ALIAS ?= champion
DEST ?=
FORCE ?=
OVERWRITE ?=
VERIFY ?=
RUN_ID ?=
RESUME ?=
STAGE ?= sft
DATA ?=
CAP ?=
OUT ?= outputs/bench-gpu
TEST_WORKERS ?= 2
PROMPT ?=
SYSTEM ?=
MAX_NEW_TOKENS ?= 256
TEMPERATURE ?= 0.7
TOP_P ?= 0.8
RUNS ?=

.DEFAULT_GOAL := help
SHELL := /bin/bash
.PHONY: help demo setup plan pipeline prepare data bench bench-gpu bench-log bench-data gpu-smoke sft align orpo dpo mirrors evaluate eval export promote pull chat serve compare rerun ui server screenshots test lint clean

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
comma := ,
EXTRAS := dev$(if $(shell command -v nvidia-smi 2>/dev/null),$(comma)gpu)

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
export MLFLOW_EXPERIMENT_NAME := $(EXPERIMENT)
export MLFLOW_DISABLE_TELEMETRY ?= true

ifeq ($(DRY_RUN),0)
  DRY := false
  RUN_EXPERIMENT := $(EXPERIMENT)
else
  DRY := true
  RUN_EXPERIMENT := $(EXPERIMENT)-dryrun
endif

# SET as one shell word, whatever quotes it holds (a ' inside becomes '\'').
SET_Q = '$(subst ','\'',$(SET))'
# A real run's pre-check also fails on what would stop it later: missing inputs, a corrupt pool, no CUDA.
CHECK := $(if $(filter 0,$(DRY_RUN)),--check)

# Check the config first (fast, clean error, no FAILED run in the store), then launch through MLflow.
# ENV_MANAGER=conda without conda: MLflow would fail before the stage starts and leave its run RUNNING.
NEED_CONDA = $(if $(filter conda,$(ENV_MANAGER)),@command -v conda > /dev/null || { echo "error: ENV_MANAGER=conda but no conda on PATH: install Miniforge$(comma) or use ENV_MANAGER=local (the .venv of make setup)" >&2; exit 2; })

define stage
	$(NEED_CONDA)
	@$(PY) -m pipeline.$(1) --hw '$(HW)' --config '$(CONFIG)' --overrides $(SET_Q) $(2) --dry-run true $(CHECK) > /dev/null
	mlflow run . -e $(1) --env-manager $(ENV_MANAGER) --experiment-name '$(RUN_EXPERIMENT)' --run-name '$(1)-$(HW)' \
	  -P hw='$(HW)' -P dry_run=$(DRY) -P config='$(CONFIG)' -P overrides=$(SET_Q) $(3)
endef

help: ## list the targets and the variables
	@echo "zh-align — make <target> [HW=4090|5090|cpu] [DRY_RUN=1|0] [SET=\"key=value ...\"] [LOSS=orpo|dpo]"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'
	@echo
	@echo "variables: DRY_RUN=$(DRY_RUN) HW=$(HW) EXPERIMENT=$(EXPERIMENT) ENV_MANAGER=$(ENV_MANAGER)" \
	  "LOSS=$(LOSS) HOST=$(HOST) PORT=$(PORT) CONFIG=$(CONFIG) SET=$(SET) ACCEL=$(ACCEL) ROWS=$(ROWS) STAGE=$(STAGE)"

demo: ## start here: set up, then run the whole chain for real on a tiny Qwen2.5 (its real tokenizer), offline, on CPU
	@$(MAKE) --no-print-directory setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(MAKE) --no-print-directory pipeline HW=cpu DRY_RUN=0 LOSS='$(LOSS)' \
	  SET='$(strip model=$(DEMO_MODEL) $(subst ','\'',$(SET)))'

setup: $(STAMP) ## create .venv and install the pinned stack (CPU torch here; + the gpu extra where nvidia-smi exists)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

plan: $(STAMP) ## the plans of all five stages on one page with predicted memory, time and disk; kept as a run
	@$(PY) -m pipeline.plan --hw '$(HW)' --loss '$(LOSS)' --overrides $(SET_Q) > /dev/null
	mlflow run . -e plan --env-manager $(ENV_MANAGER) --experiment-name '$(EXPERIMENT)' \
	  -P hw='$(HW)' -P loss='$(LOSS)' -P overrides=$(SET_Q)

pipeline: $(STAMP) ## prepare → sft → align → evaluate → export as child runs of one parent run (LOSS=orpo|dpo, RESUME=run id)
	$(if $(filter 0,$(DRY_RUN)),$(PY) -m pipeline.mirrors --hw '$(HW)' --overrides $(SET_Q) --if-missing)
	@$(PY) -m pipeline.pipeline --hw '$(HW)' --loss '$(LOSS)' --accel '$(ACCEL)' --overrides $(SET_Q) --dry-run true $(CHECK) > /dev/null
	mlflow run . -e pipeline --env-manager $(ENV_MANAGER) --experiment-name '$(RUN_EXPERIMENT)' \
	  --run-name 'pipeline-$(HW)-$(LOSS)' \
	  -P hw='$(HW)' -P dry_run=$(DRY) -P loss='$(LOSS)' -P overrides=$(SET_Q) -P accel='$(ACCEL)' -P resume='$(RESUME)'

prepare: $(STAMP) ## clean, dedup and bucket the datasets into SFT and preference pools + data card
	$(call stage,prepare)

data: prepare ## alias of prepare

bench: $(STAMP) ## tokens/s, MFU and peak memory of STAGE=sft|dpo|orpo on HW's profile beside TRL's defaults (DATA=pool, CAP=GiB)
	$(PY) -m pipeline.bench --hw '$(HW)' --stage '$(STAGE)' --overrides $(SET_Q) $(if $(DATA),--data '$(DATA)') \
	  $(if $(CAP),--mem-cap-gib $(CAP)) --out outputs/bench/$(HW)-$(STAGE)

bench-gpu: $(STAMP) ## on an H100/H200 (≤ 8 min): every profile under its card's cap vs its baseline and the planner; JSON in OUT
	$(PY) tools/bench_gpu.py --out '$(OUT)'

bench-log: $(STAMP) ## OUT's bench results (e.g. bench-gpu's, brought back from a GPU box) as MLflow runs; their speeds to the planner
	$(PY) -m pipeline.bench --log-results '$(OUT)'

bench-data: $(STAMP) ## prepare's data path on ROWS synthetic zh/en rows: cleaning vs a naive loop, token pass vs encode_batch, end to end (time, peak memory)
	$(PY) tools/bench_data.py --rows $(ROWS)

gpu-smoke: $(STAMP) ## on a CUDA GPU: sft in bf16 / QLoRA / Liger, DPO and ORPO-QLoRA from it, a forced OOM; JSON in outputs/gpu-smoke
	$(PY) tools/gpu_smoke.py --out outputs/gpu-smoke

sft: $(STAMP) ## LoRA/QLoRA supervised fine-tuning; registers the adapter as zh-align-sft (ACCEL=ddp|fsdp|zero2|zero3: all GPUs)
	$(call stage,sft,--accel '$(ACCEL)',-P accel='$(ACCEL)')

align: $(STAMP) ## preference alignment from the SFT adapter, LOSS=orpo|dpo
	$(call stage,align,--loss '$(LOSS)' --accel '$(ACCEL)',-P loss='$(LOSS)' -P accel='$(ACCEL)')

orpo: ## align with ORPO (= make align LOSS=orpo)
	@$(MAKE) --no-print-directory align LOSS=orpo

dpo: ## align with DPO (= make align LOSS=dpo)
	@$(MAKE) --no-print-directory align LOSS=dpo

mirrors: $(STAMP) ## download the eval sets (CMMLU, C-Eval, hellaswag, winogrande) at pinned revisions, SHA256-checked, into .cache/eval-mirrors
	$(PY) -m pipeline.mirrors --hw '$(HW)' --config '$(CONFIG)' --overrides $(SET_Q) $(if $(filter 1,$(FORCE)),--force)

evaluate: $(STAMP) ## lm-eval on cmmlu / ceval-valid / hellaswag / winogrande, tuned vs base (DRY_RUN=0: make mirrors first where one is missing)
	$(if $(filter 0,$(DRY_RUN)),$(PY) -m pipeline.mirrors --hw '$(HW)' --config '$(CONFIG)' --overrides $(SET_Q) --if-missing)
	$(call stage,evaluate)

eval: evaluate ## alias of evaluate

export: $(STAMP) ## merge the adapter into the bf16 base and register zh-align-merged
	$(call stage,export)

promote: $(STAMP) ## move ALIAS (champion) to MODEL's VERSION; refused when its eval gate failed unless FORCE=1
	$(PY) -m pipeline.registry promote --model '$(MODEL)' --version '$(VERSION)' --alias '$(ALIAS)' $(if $(filter 1,$(FORCE)),--force)

pull: $(STAMP) ## download MODEL (name@alias or name/version) into DEST; OVERWRITE=1 replaces it, VERIFY=1 checks logits
	$(PY) -m pipeline.registry pull --model '$(MODEL)' --dest '$(DEST)' --hw '$(HW)' --overrides $(SET_Q) \
	  $(if $(filter 1,$(OVERWRITE)),--overwrite) $(if $(filter 1,$(VERIFY)),--verify)

chat: $(STAMP) ## talk to MODEL (name@alias, name/version, run id or folder) in the terminal; PROMPT="…" answers once
	$(PY) -m pipeline.chat --model '$(MODEL)' --hw '$(HW)' --overrides '$(SET)' --max-new-tokens '$(MAX_NEW_TOKENS)' \
	  --temperature '$(TEMPERATURE)' --top-p '$(TOP_P)' $(if $(SYSTEM),--system '$(SYSTEM)') $(if $(PROMPT),--prompt '$(PROMPT)')

serve: $(STAMP) ## serve the registered MODEL (name@alias or name/version) over HTTP on HOST:PORT (POST /invocations)
	@test -n '$(MODEL)' || { echo "make serve: give MODEL=name@alias or name/version (e.g. MODEL=zh-align-merged@champion)" >&2; exit 2; }
	mlflow models serve -m 'models:/$(MODEL)' --host '$(HOST)' --port '$(PORT)' --env-manager '$(ENV_MANAGER)'

compare: $(STAMP) ## eval scores, deltas, final loss, tokens/s, wall time of RUNS="id …" (default: the last 5 pipeline runs)
	$(PY) -m pipeline.compare --runs '$(RUNS)'

rerun: $(STAMP) ## re-run the finished stage or pipeline run RUN_ID from what it logged; reports what came out identical
	$(PY) -m pipeline.rerun --run-id '$(RUN_ID)' $(if $(filter 0,$(DRY_RUN)),,--dry-run)

ui: $(STAMP) ## serve the MLflow UI for this project's store on HOST:PORT (127.0.0.1: this machine only; no login)
	mlflow ui --backend-store-uri "$(MLFLOW_TRACKING_URI)" --host '$(HOST)' --port $(PORT)

server: $(STAMP) ## an MLflow tracking server on HOST:PORT with its own store (DB=postgresql://… for a lab); prints the URI to export
	@MLFLOW_BACKEND_STORE_URI='$(DB)' $(PY) -m pipeline.server --host '$(HOST)' --port '$(PORT)'

screenshots: $(STAMP) ## retake docs/img/*.png, the README's MLflow UI screenshots (after make demo; needs Debian's chromium)
	$(PY) docs/screenshots.py

test: $(STAMP) ## run the test suite (CPU, offline) on TEST_WORKERS processes, a test file each at a time
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP) ## ruff over the package, the tests, tools/ and docs/screenshots.py
	$(PY) -m ruff check pipeline tests tools docs

clean: ## remove outputs/, caches and the tiny models (keeps mlflow.db and mlruns/, your run history)
	rm -rf outputs .cache/tiny-models .pytest_cache .ruff_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
