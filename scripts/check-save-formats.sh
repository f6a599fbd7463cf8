#!/usr/bin/env bash
# Held-out check: models saved by sentence-transformers releases this project does not pin are
# exported and compared with that release's own vectors (tests/heldout/save_formats.py).
#   scripts/check-save-formats.sh                # the releases it lists
#   scripts/check-save-formats.sh 5.2.3 6.1.0    # others
# Needs PyPI; each release gets a virtual environment of its own under .heldout/ (kept).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/jobbert-onnx ] || scripts/setup.sh
exec .venv/bin/python tests/heldout/save_formats.py "$@"
