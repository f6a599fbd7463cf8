"""The outlier replica the GPU proof measures fp16 on: `python -m benchmarks.gpu.outliers MODEL EXPORT SIZE DEVICE`.

Builds a random-weight replica with trained encoders' outlier dimensions
(`random-model --outliers`), exports its fp32 encoder (validated on DEVICE), then
derives from it the fp16 encoder and the packed one, unvalidated: the proof
measures them against fp32 PyTorch whatever the export's gate would say
(`benchmarks.gpu.probe fidelity`). Needs no GPU timing, so the proof runs it
beside the main export; each part is reused when a later run finds it done.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.mask_exports import add_fp16, add_packed


def fp32_ready(export: Path, device: str) -> bool:
    """Whether `export` has an fp32 encoder validated on `device` that passed."""
    try:
        fp32 = json.loads((export / "manifest.json").read_text())["variants"]["fp32"]
    except (OSError, ValueError, KeyError):
        return False
    return bool(fp32["validation"].get("passed")) and str(fp32["validation"].get("device", "")).startswith(device)


def ready(export: Path, device: str) -> bool:
    """Whether `export` holds all the proof measures: the validated fp32 encoder, fp16 and packed."""
    if not fp32_ready(export, device):
        return False
    fp16 = json.loads((export / "manifest.json").read_text())["variants"].get("fp16", {})
    return bool(fp16.get("packed"))


def prepare(model: Path, export: Path, size: str, device: str) -> None:
    from jobbert_onnx.export import export_model
    from jobbert_onnx.export.random_model import build_random_model

    if not (model / "modules.json").is_file():
        build_random_model(model, size=size, layout="router", seed=1, outliers=True)
    if not fp32_ready(export, device):
        export_model(str(model), export, precision="fp32", overwrite=True, validate_device=device)
    add_packed(add_fp16(export))


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        raise SystemExit("usage: python -m benchmarks.gpu.outliers MODEL EXPORT SIZE DEVICE")
    model, export, size, device = argv
    prepare(Path(model), Path(export), size, device)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
