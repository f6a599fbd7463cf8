#!/usr/bin/env bash
# The GPU proof (benchmarks/gpu/proof.py has the steps): one command, results in OUT_DIR as it goes.
#
#   scripts/gpu-proof.sh OUT_DIR               full run, at most 8 minutes
#   scripts/gpu-proof.sh OUT_DIR --quick       model, parity, batch 1, one throughput point: 3 minutes
#   scripts/gpu-proof.sh OUT_DIR --rehearse    the same on the CPU with the tiny model (CI runs this)
#
# On the lent GPU machine, after the onnxruntime-gpu parts (scripts/stage-gpu.sh):
#   source .device/ort/install.sh && scripts/gpu-proof.sh $OUT
# Then here: python -m benchmarks.gpu.fold FOLDER_IT_RETURNED
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=python3
[ -x "$root/.venv/bin/python" ] && python="$root/.venv/bin/python"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m benchmarks.gpu.proof "$@"
