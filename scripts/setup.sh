#!/usr/bin/env bash
# Create .venv (Python 3.11 unless PYTHON names another) and install the project with the tested version of every
# dependency (constraints.txt). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# pydensecrf2 builds from source (about 45 s, needs gcc); torch/torchvision are pinned in pyproject.toml
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev,bench,onnx,tracking]' 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import fuss_components, fuss_flare, nvflare, torch, timm, pydensecrf.densecrf, pydicom, matplotlib, \
onnx, onnxscript, onnxruntime" \
  || { echo "setup failed: the packages above do not import" >&2; exit 1; }
