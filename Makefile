# ctbench — the entry points. `make help` lists them.
#
#   make demo                         # whole pipeline on the embedded toy data, tables printed at the end
#   make test                         # the test suite (what CI runs)
#   make pretrain LOSS=jcl [DATA=...] [ARGS="optim.lr=0.06 ..."]
#   make transfer TASK=coco_mask [WEIGHTS=x.pkl] [TRIALS=5]
#   make tables
#
# Every target sets up what is missing first (.venv, toy data), so each works on a fresh machine. Toy data is
# generated only at the default location ($(TOY_ROOT), ./datasets) and only where a stage would read it and it is
# missing: a DETECTRON2_DATASETS that points elsewhere (your real data) is never written to.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
TOY_ROOT ?= $(CURDIR)/datasets
export DETECTRON2_DATASETS ?= $(TOY_ROOT)
export CTBENCH_OUTPUT ?= $(CURDIR)/outputs
export PYTHONUNBUFFERED := 1
# OpenMP threads that sleep instead of spinning while they wait: on a shared or small CPU (and beside DataLoader
# workers) spinning threads made toy steps 6-9x slower (transfer/README.md); no effect on GPU work.
export OMP_WAIT_POLICY ?= PASSIVE

SCALE ?= 1
LOSS ?= moco_v2
METHOD ?= $(LOSS)
DATA ?=
ARGS ?=
CKPT ?=
WEIGHTS ?=
TASK ?= voc_det
TRIALS ?= 1
MODE ?=
PCT ?= 1
SUBSET ?=
SPEC ?=
FORCE ?=
NPROC ?= 1
PYTEST_ARGS ?=

# $(call toy,DATASET): the toy DATASET (imagenet, coco, voc) when the stage reads the default root and it is missing.
ifeq ($(abspath $(DETECTRON2_DATASETS)),$(abspath $(TOY_ROOT)))
toy = @$(PY) -m ctbench.toydata --root "$(TOY_ROOT)" --only $(1) --if-missing
else
toy =
endif
# Detection tasks on VOC read the toy VOC, the others the toy COCO.
TASK_DATA = $(if $(filter voc%,$(TASK)),voc,coco)

.PHONY: help setup data demo test test-all lint pretrain convert transfer tasks lincls semisup tables bench sweep chaos clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup:  ## create/refresh .venv (idempotent; < 10 s when nothing changed)
	@scripts/setup.sh

data: setup  ## generate the embedded toy datasets under $DETECTRON2_DATASETS (SCALE=4 for a larger set)
	@$(PY) -m ctbench.toydata --root "$(DETECTRON2_DATASETS)" --scale $(SCALE)

demo: setup  ## whole pipeline on the embedded toy data (./datasets, or TOY_ROOT) -> results/demo/ (FORCE=1 reruns finished stages)
	@DETECTRON2_DATASETS="$(TOY_ROOT)" $(PY) -m orchestrate.demo $(if $(FORCE),--force) $(ARGS)

test: setup  ## run the test suite, CI's tier: every test not marked slow (tests generate their own tiny data)
	@$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: setup  ## every test, the slow ones too (multi-process kill/restart, interrupt and chaos scenarios)
	@$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup  ## ruff
	@$(VENV)/bin/ruff check .

pretrain: setup  ## pretrain METHOD= (or LOSS=) moco_v1|moco_v2|jcl|jcl_official|eqco|simo|co2|co2_moco_v1 [DATA=dir] [NPROC=n] [ARGS="k=v ..."]
	$(if $(DATA),,$(call toy,imagenet))
	@$(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC),$(PY)) -m pretrain \
		--method $(METHOD) $(if $(DATA),--data "$(DATA)") $(ARGS)

convert: setup  ## convert CKPT (default: newest pretraining output) to a detectron2 .pkl
	@$(PY) -m transfer.convert $(if $(CKPT),"$(CKPT)",--newest) $(ARGS)

transfer: setup  ## transfer TASK= (one of `make tasks`; default voc_det) [WEIGHTS=] [TRIALS=] [NPROC=]
	$(call toy,$(TASK_DATA))
ifeq ($(TASK),voc07_svm)
	@$(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC),$(PY)) -m transfer.voc07_svm \
		$(if $(WEIGHTS),--ckpt "$(WEIGHTS)") $(ARGS)
else
	@$(PY) -m transfer.detection --task $(TASK) $(if $(WEIGHTS),--weights "$(WEIGHTS)") --trials $(TRIALS) \
		$(if $(filter-out 1,$(NPROC)),--num-gpus $(NPROC)) $(ARGS)
endif

tasks: setup  ## list the transfer tasks: name, program, schedule, the original recipe each follows
	@$(PY) -m transfer.tasks

lincls: setup  ## linear probe of CKPT (default newest) [MODE=standard|cached] (default: standard, toy data: cached)
	$(call toy,imagenet)
	@$(PY) -m transfer.linear $(if $(CKPT),--ckpt "$(CKPT)") $(if $(MODE),--mode $(MODE)) $(ARGS)

semisup: setup  ## semi-supervised fine-tuning PCT=1|10 [CKPT=] [SUBSET=file]
	$(call toy,imagenet)
	@$(PY) -m transfer.semisup --pct $(PCT) $(if $(CKPT),--ckpt "$(CKPT)") $(if $(SUBSET),--subset "$(SUBSET)") $(ARGS)

tables: setup  ## tables + plots from every run record under $CTBENCH_OUTPUT -> results/generated/
	@$(PY) -m results.tables --records "$(CTBENCH_OUTPUT)" --out results/generated $(ARGS)

bench: setup  ## speed/memory benchmarks -> benchmarks/reports/
	@$(PY) -m benchmarks $(ARGS)

sweep: setup  ## ablation grid from a YAML spec: make sweep SPEC=results/sweeps/jcl_m_toy.yaml
	$(call toy,imagenet)
	@$(PY) -m orchestrate.sweep $(SPEC) $(ARGS)

chaos: setup  ## kill/resume and bad-input scenarios on the toy ImageNet (./datasets); prints tried / survived / data lost
	@$(PY) -m ctbench.toydata --root "$(TOY_ROOT)" --only imagenet --if-missing
	@DETECTRON2_DATASETS="$(TOY_ROOT)" $(PY) -m orchestrate.chaos $(ARGS)

clean:  ## remove outputs and generated data (keeps .venv)
	rm -rf "$(CTBENCH_OUTPUT)" "$(TOY_ROOT)" results/demo results/generated .pytest_cache
