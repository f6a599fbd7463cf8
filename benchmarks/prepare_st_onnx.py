"""Run in the peers' environment: export the model with sentence-transformers' ONNX backend,
then its O3-optimized and dynamically int8-quantized variants, as its documentation shows.

    python -m benchmarks.prepare_st_onnx MODEL_COPY_DIR QUANTIZATION_PRESET
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.backend import export_dynamic_quantized_onnx_model, export_optimized_onnx_model

    folder, preset = Path(argv[0]), argv[1]
    model = SentenceTransformer(str(folder), backend="onnx", device="cpu")
    model.save(str(folder))
    export_optimized_onnx_model(model, "O3", str(folder))
    export_dynamic_quantized_onnx_model(model, preset, str(folder))
    print(sorted(p.name for p in (folder / "onnx").glob("*.onnx")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
