#!/usr/bin/env bash
# Stage onnxruntime-gpu for the lent GPU machine (CPython 3.12, CUDA 13, cuDNN 9, no package index).
#
#   scripts/stage-gpu.sh [VERSION]        (default 1.31.1; about 3 minutes, once)
#
# Writes .device/ort/ (ignored by git): part-0 ... part-N (at most 56 MiB each: the wheel repacked
# with its CUDA provider library xz-compressed, 4 parts instead of 5), parts.json (sha256 of each
# part and of the whole) and install.sh. Then, with the device tool, back to back:
#   each part but the last:  carry [.device/ort/part-K, .device/ort/parts.json]
#                            command: mkdir -p /tmp/ortparts && cp .device/ort/part-K .device/ort/parts.json /tmp/ortparts/
#   the proof, with the last part:
#                            carry [.device/ort/part-N, .device/ort/parts.json, .device/ort/install.sh]
#                            command: source .device/ort/install.sh && scripts/gpu-proof.sh $OUT
# install.sh names any part that is missing or damaged.
set -euo pipefail
ver="${1:-1.31.1}"
cd "$(dirname "$0")/.."
dir=.device/ort
mkdir -p "$dir/whl"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$dir/whl" "onnxruntime-gpu==$ver"
whl=$(ls "$dir"/whl/onnxruntime_gpu-"$ver"-cp312-*.whl)
python3 -m benchmarks.gpu.stage pack "$whl" "$dir"
cat > "$dir/install.sh" <<'INSTALL'
# Sourced on the GPU machine, from the repository root: installs the staged onnxruntime-gpu into
# /tmp/ortsite (once per machine; parts that came earlier wait in /tmp/ortparts), then points
# PYTHONPATH at it and LD_LIBRARY_PATH at the CUDA libraries of the machine's nvidia-* packages.
mkdir -p /tmp/ortparts
cp .device/ort/part-* .device/ort/parts.json /tmp/ortparts/ 2>/dev/null
python3 -m benchmarks.gpu.stage unpack /tmp/ortsite /tmp/ortparts || return 1
export PYTHONPATH=/tmp/ortsite${PYTHONPATH:+:$PYTHONPATH}
export LD_LIBRARY_PATH=$(python3 -m benchmarks.gpu.stage libpath)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
INSTALL
ls -la "$dir"
