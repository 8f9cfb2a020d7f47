#!/usr/bin/env bash
# The whole GPU benchmark in one command, on a GPU machine that has torch + torchvision but no network:
#
#   benchmarks/gpu/run.sh                          # compute, switches, pipeline, data, profile: the CUDA report
#   benchmarks/gpu/run.sh --only transfer --tag cuda-transfer   # detectron2 / linear probe stages, separately
#
# Installs the carried wheels of .whl/ (made by benchmarks/gpu/wheels.sh) into /tmp/site when detectron2 is not
# importable, runs `python -m benchmarks --device cuda` (sizes: benchmarks/suite.py Settings.for_device("cuda"):
# 224 px, batch 256, 5 alternating windows of 6 steps, torch.compile in the switch table) under a limit of
# $BENCH_LIMIT_S seconds (default 480: the report has to be written within 8 minutes of a 15-minute device loan),
# and copies the report (and, with $OUT set, the records) to $OUT. The report lands in
# benchmarks/reports/cuda-<gpu model>.md(.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import detectron2" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    else
        echo "[gpu] detectron2 is not importable and no wheels in .whl/: the transfer section will report it" >&2
    fi
fi
export CTBENCH_OUTPUT=${CTBENCH_OUTPUT:-/tmp/ctbench-out}
export DETECTRON2_DATASETS=${DETECTRON2_DATASETS:-/tmp/ctbench-datasets}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv || true
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--only compute,switches,pipeline,data,profile)
status=0
start=$(date +%s)
timeout -s INT "${BENCH_LIMIT_S:-480}" "$PY" -m benchmarks --device cuda "${args[@]}" || status=$?
echo "[gpu] python -m benchmarks ${args[*]}: exit $status after $(( $(date +%s) - start )) s" >&2
if [ -n "${OUT:-}" ]; then
    cp benchmarks/reports/cuda-*.md benchmarks/reports/cuda-*.json "$OUT"/ 2>/dev/null || true
fi
exit $status
