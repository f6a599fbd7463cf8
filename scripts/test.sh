#!/usr/bin/env bash
# Set up (if needed), then lint, type-check and run the whole test suite.
# GPU tests are skipped, with the reason, where onnxruntime's CUDA provider cannot load.
# Pass pytest arguments through, e.g.: scripts/test.sh -m "not fullsize"
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/jobbert-onnx ] || scripts/setup.sh
.venv/bin/ruff check jobbert_onnx tests benchmarks
.venv/bin/ruff format --check jobbert_onnx tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest -rs "$@"
