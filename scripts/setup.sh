#!/usr/bin/env bash
# Create .venv with jobbert-onnx, the exporter and the test tools.
# torch is pinned to the CPU build first, so the exporter's `torch` requirement
# does not pull a CUDA build of several gigabytes.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[dev]'
.venv/bin/python -c "import jobbert_onnx, onnxruntime; print('jobbert-onnx ready; onnxruntime', onnxruntime.__version__)"
