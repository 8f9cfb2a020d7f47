#!/usr/bin/env bash
# Create or update the project's virtual environment in .venv (idempotent).
#
#   scripts/setup.sh            # what `make setup` runs
#
# A stamp keyed on the requirement files makes a second run with nothing changed return at once.
# torch/torchvision are pinned through requirements/constraints.txt (see requirements/README.md). Detectron2: an
# importable one is kept (e.g. built by the user from the official sources); otherwise the registry repackaging
# `sal-detectron2` (upstream commit a59f0563) is installed as pure Python, as requirements/README.md describes.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.ctbench-setup"
key=$(cat pyproject.toml requirements/*.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ] && "$VENV/bin/python" -c "import ctbench" 2>/dev/null; then
    exit 0
fi

echo "[setup] creating/updating $VENV (first time: a few minutes; torch is a large download from the local copy)"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -qq --upgrade "pip>=23.2"
# --no-compile, then one parallel compileall below: pip compiles the ~20k files of torch & co. one at a time
# (measured on 2 cores: 82 s for this install, against 42 s + 16 s).
"${pip[@]}" install -qq --no-compile -c requirements/constraints.txt -e ".[dev]"

if "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
    echo "[setup] detectron2 already importable: keeping it"
else
    echo "[setup] installing detectron2 (sal-detectron2 0.7.2 repackaging, pure Python)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    grep -v '^sal-detectron2' requirements/detectron2.txt > "$tmp/deps.txt"
    "${pip[@]}" install -qq --no-compile -c requirements/constraints.txt -r "$tmp/deps.txt"
    spec=$(grep '^sal-detectron2' requirements/detectron2.txt)
    "${pip[@]}" download -qq --no-deps --only-binary=:all: --python-version 3.10 "$spec" -d "$tmp"
    whl=$(ls "$tmp"/sal_detectron2-*.whl)
    # The wheel holds only Python files plus a _C built for CPython 3.10 that is never loaded on other versions;
    # retagging it as py3-none-any lets pip install it on any Python 3.
    any="$tmp/$(basename "$whl" | sed -E 's/-cp[0-9]+-none-any\.whl$/-py3-none-any.whl/')"
    [ "$whl" = "$any" ] || mv "$whl" "$any"
    "${pip[@]}" install -qq --no-compile --no-deps "$any"
fi
# Byte-compile what was installed, on every core. As with pip's own compile step, a file that does not compile
# (torch ships a few in newer syntax for newer Pythons, never imported here) is skipped, so the status is ignored.
"$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    > /dev/null 2>&1 || true
"$VENV/bin/python" -c "import detectron2, detectron2.model_zoo; print('[setup] detectron2', detectron2.__version__)"

echo "$key" > "$STAMP"
echo "[setup] done: $VENV"
