# ctbench in a container (GPU clusters: run with `docker run --gpus all --ipc=host ...`).
#
#   docker build -t ctbench .
#   docker run --rm --gpus all --ipc=host -v /data:/data -e DETECTRON2_DATASETS=/data ctbench \
#       make pretrain LOSS=moco_v2 DATA=/data/imagenet/train NPROC=8
#   docker run --rm ctbench make demo         # CPU, embedded toy data
#
# Base: NVIDIA's CUDA 13 runtime (cuDNN) image, matching the CUDA 13 build of the pinned torch 2.14.1 that
# scripts/setup.sh installs into .venv through requirements/constraints.txt, exactly as `make setup` does anywhere
# else (one setup path, one set of pins; tests/test_setup.py checks this file against them). The NVIDIA driver comes
# from the host (nvidia-container-toolkit). The image cannot be built on the development machines (no Docker
# engine there): the base tag is the one CUDA 13.0 runtime tag we target, override it with --build-arg BASE=...
ARG BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive PYTHON=python3
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev make git gcc g++ libgl1 \
    libglib2.0-0 \
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
