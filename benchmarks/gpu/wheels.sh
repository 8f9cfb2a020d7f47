#!/usr/bin/env bash
# Fetch (here, with network) the wheels a GPU machine without network lacks for the whole benchmark, into .whl/
# at the repository root (git-ignored through .git/info/exclude). The GPU image has Python 3.12 with torch 2.11,
# torchvision 0.26, numpy, pillow, pyyaml, tqdm, pandas, matplotlib, tensorboard, cloudpickle, tabulate and
# portalocker, but not detectron2, its config/IO packages or pycocotools.
#
#   benchmarks/gpu/wheels.sh            # -> .whl/*.whl (about 10 MB)
#
# detectron2 is the registry repackaging sal-detectron2 0.7.2 (upstream commit a59f0563), retagged py3-none-any
# as scripts/setup.sh does (its compiled _C is for CPython 3.10 and is never loaded; torchvision's ops are used).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
WHL=.whl
mkdir -p "$WHL"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$WHL/" "$exclude" 2>/dev/null || echo "/$WHL/" >> "$exclude"
pip=("$PY" -m pip --disable-pip-version-check)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Binary wheels for CPython 3.12 on x86-64 Linux (pure-Python ones match any platform).
"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$WHL" pycocotools==2.0.11 faster-coco-eval==1.8.0 yacs==0.1.8 termcolor==3.3.0 omegaconf==2.3.1 \
    hydra-core==1.3.8 setuptools==80.10.2
# Source-only packages: build pure-Python wheels here.
"${pip[@]}" wheel -q --no-deps -w "$WHL" fvcore==0.1.5.post20221221 iopath==0.1.10 antlr4-python3-runtime==4.9.3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.10 -d "$tmp" sal-detectron2==0.7.2
whl=$(ls "$tmp"/sal_detectron2-*.whl)
cp "$whl" "$WHL/$(basename "$whl" | sed -E 's/-cp[0-9]+-none-any\.whl$/-py3-none-any.whl/')"
ls -la "$WHL"
du -sh "$WHL"
