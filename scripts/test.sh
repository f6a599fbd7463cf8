#!/usr/bin/env bash
# Set up (if needed), then lint, type-check and run the tests.
#   scripts/test.sh          the everyday loop: everything but the slow and full-size tests (minutes)
#   scripts/test.sh --all    everything, as CI runs it (about half an hour on two cores)
# GPU tests are skipped, with the reason, where onnxruntime's CUDA provider cannot load.
# Other arguments go to pytest, e.g.: scripts/test.sh tests/test_cache.py -k offline
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/jobbert-onnx ] || scripts/setup.sh
select=(-m "not slow and not fullsize and not ray")
if [ "${1:-}" = "--all" ]; then
    select=()
    shift
fi
.venv/bin/ruff check jobbert_onnx tests benchmarks studies
.venv/bin/ruff format --check jobbert_onnx tests benchmarks studies
.venv/bin/mypy
.venv/bin/python -m pytest -rs --durations=15 "${select[@]}" "$@"
