#!/usr/bin/env bash
# Create .venv with jobbert-onnx, the exporter and the test tools.
# torch is pinned to the CPU build first, so the exporter's `torch` requirement
# does not pull a CUDA build of several gigabytes.
# pip's output goes to .venv/setup.log; a failing step prints its last lines.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
log=.venv/setup.log
: > "$log"
step() {
    local what=$1
    shift
    local started=$SECONDS
    printf 'setup: %s ... ' "$what"
    if "$@" >> "$log" 2>&1; then
        echo "done ($((SECONDS - started)) s)"
    else
        echo "FAILED; the last lines of $log:"
        tail -n 30 "$log"
        exit 1
    fi
}
step "upgrading pip" .venv/bin/pip install -q --upgrade pip
step "installing torch 2.13.0 (CPU build)" .venv/bin/pip install -q torch==2.13.0
step "installing jobbert-onnx[dev] (editable)" .venv/bin/pip install -q -e '.[dev]'
.venv/bin/python -c "import jobbert_onnx, onnxruntime; print('setup: jobbert-onnx ready; onnxruntime', onnxruntime.__version__)"
