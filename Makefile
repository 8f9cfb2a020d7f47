# ctbench — the entry points. `make help` lists them.
#
#   make demo                         # whole pipeline on the embedded toy data, tables printed at the end
#   make test                         # the test suite (what CI runs)
#   make pretrain LOSS=jcl [DATA=...] [ARGS="optim.lr=0.06 ..."]
#   make transfer TASK=coco_mask [WEIGHTS=x.pkl] [TRIALS=5]
#   make tables
#
# Every target sets up what is missing first (.venv, toy data), so each works on a fresh machine.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
export DETECTRON2_DATASETS ?= $(CURDIR)/datasets
export CTBENCH_OUTPUT ?= $(CURDIR)/outputs
export PYTHONUNBUFFERED := 1
# OpenMP threads that sleep instead of spinning while they wait: on a shared or small CPU (and beside DataLoader
# workers) spinning threads made toy steps 6-9x slower (transfer/README.md); no effect on GPU work.
export OMP_WAIT_POLICY ?= PASSIVE

SCALE ?= 1
LOSS ?= moco_v2
DATA ?=
ARGS ?=
CKPT ?=
WEIGHTS ?=
TASK ?= voc_det
TRIALS ?= 1
MODE ?= cached
PCT ?= 1
SUBSET ?=
SPEC ?=
FORCE ?=
NPROC ?= 1
PYTEST_ARGS ?=

.PHONY: help setup data demo test lint pretrain convert transfer lincls semisup tables bench sweep chaos clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup:  ## create/refresh .venv (idempotent; < 10 s when nothing changed)
	@scripts/setup.sh

data: setup  ## generate the embedded toy datasets under $DETECTRON2_DATASETS (SCALE=4 for a larger set)
	@$(PY) -m ctbench.toydata --root "$(DETECTRON2_DATASETS)" --scale $(SCALE)

demo: data  ## whole pipeline on the toy data -> results/demo/ (FORCE=1 reruns finished stages)
	@$(PY) -m ctbench.demo $(if $(FORCE),--force) $(ARGS)

test: setup  ## run the test suite (tests generate their own tiny data)
	@$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup  ## ruff
	@$(VENV)/bin/ruff check .

pretrain: $(if $(DATA),setup,data)  ## pretrain LOSS=moco_v1|moco_v2|jcl|jcl_official|eqco|simo|co2 [DATA=dir] [NPROC=n] [ARGS="k=v ..."]
	@$(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC),$(PY)) -m pretrain \
		--loss $(LOSS) $(if $(DATA),--data "$(DATA)") $(ARGS)

convert: setup  ## convert CKPT (default: newest pretraining output) to a detectron2 .pkl
	@$(PY) -m transfer.convert $(if $(CKPT),"$(CKPT)",--newest) $(ARGS)

transfer: data  ## detectron2 transfer TASK=voc_det|coco_det|coco_mask|coco_det_c4|coco_mask_c4|coco_kp [WEIGHTS=] [TRIALS=]
	@$(PY) -m transfer.detection --task $(TASK) $(if $(WEIGHTS),--weights "$(WEIGHTS)") --trials $(TRIALS) \
		$(if $(filter-out 1,$(NPROC)),--num-gpus $(NPROC)) $(ARGS)

lincls: data  ## linear probe of CKPT (default newest) MODE=cached|standard
	@$(PY) -m transfer.linear $(if $(CKPT),--ckpt "$(CKPT)") --mode $(MODE) $(ARGS)

semisup: data  ## semi-supervised fine-tuning PCT=1|10 [CKPT=] [SUBSET=file]
	@$(PY) -m transfer.semisup --pct $(PCT) $(if $(CKPT),--ckpt "$(CKPT)") $(if $(SUBSET),--subset "$(SUBSET)") $(ARGS)

tables: setup  ## tables + plots from every run record under $CTBENCH_OUTPUT -> results/
	@$(PY) -m results.tables --records "$(CTBENCH_OUTPUT)" --out results/generated $(ARGS)

bench: data  ## speed/memory benchmarks -> benchmarks/reports/
	@$(PY) -m benchmarks $(ARGS)

sweep: data  ## ablation grid from a YAML spec: make sweep SPEC=results/sweeps/jcl_m.yaml
	@$(PY) -m ctbench.sweep $(SPEC) $(ARGS)

chaos: data  ## kill/resume and bad-input scenarios; prints tried / survived / data lost
	@$(PY) -m ctbench.chaos $(ARGS)

clean:  ## remove outputs and generated data (keeps .venv)
	rm -rf "$(CTBENCH_OUTPUT)" "$(DETECTRON2_DATASETS)" results/demo results/generated .pytest_cache
