#!/usr/bin/env bash
# The main job, offline: build a full-size JobBERT-v3-shaped model with RANDOM
# weights (the real weights need the model hub), export it to validated ONNX
# graphs, and encode job titles and skill lists with the torch-free runtime.
# With hub access, export the real model instead:
#   .venv/bin/jobbert-onnx export TechWolf/JobBERT-v3 models/jobbert-v3-onnx
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/jobbert-onnx ] || scripts/setup.sh
[ -f models/jobbert-v3-random/modules.json ] || .venv/bin/jobbert-onnx random-model models/jobbert-v3-random --size full
.venv/bin/jobbert-onnx export models/jobbert-v3-random models/jobbert-v3-onnx --overwrite   # fp16 (GPU) + int8 (CPU)
.venv/bin/python - <<'PY'
from jobbert_onnx import Encoder

enc = Encoder.load("models/jobbert-v3-onnx", device="auto")
print(enc)
titles = enc.encode(["Software Engineer", "Produktmanager", "ingeniero de datos", "数据分析师"], task="anchor")
skills = enc.encode(["python, sql, data pipelines", "Kundenberatung, Verkauf"], task="positive",
                    normalize_embeddings=True)
print("titles:", titles.shape, titles.dtype, " skills:", skills.shape)
print("cosine(titles, skills) (random weights: the numbers carry no meaning):")
print(enc.similarity(titles, skills).round(3))
PY
