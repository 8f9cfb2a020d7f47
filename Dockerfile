# ctbench in a container (GPU clusters: run with `docker run --gpus all --ipc=host ...`).
#
#   docker build -t ctbench .
#   docker run --rm --gpus all --ipc=host -v /data:/data -e DETECTRON2_DATASETS=/data ctbench \
#       make pretrain LOSS=moco_v2 DATA=/data/imagenet/train NPROC=8
#   docker run --rm ctbench make demo         # CPU, embedded toy data
#
# torch 2.14.1 from the package index is a CUDA 13 build; the NVIDIA driver comes from the host
# (nvidia-container-toolkit). The image holds the same .venv that `make setup` builds anywhere else.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends make git gcc g++ libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /ctbench
# Dependencies first, so code changes do not reinstall torch.
COPY pyproject.toml README.md ./
COPY requirements requirements
COPY scripts scripts
COPY ctbench/__init__.py ctbench/__init__.py
RUN mkdir -p pretrain transfer results benchmarks \
 && for p in pretrain transfer results benchmarks; do touch $p/__init__.py; done \
 && scripts/setup.sh
COPY . .
RUN scripts/setup.sh

ENV DETECTRON2_DATASETS=/ctbench/datasets CTBENCH_OUTPUT=/ctbench/outputs
CMD ["make", "help"]
