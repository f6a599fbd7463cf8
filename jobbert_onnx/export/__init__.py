"""The exporter: JobBERT-v3 (hub id or folder) -> validated ONNX graphs. Needs `jobbert-onnx[export]`.

The names below load on first use, so that `jobbert_onnx.export.random_model`'s
constants (read by the CLI) import without torch or onnx.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_HOMES = {
    "export_model": "jobbert_onnx.export.pipeline",
    "UnsupportedModelError": "jobbert_onnx.export.source",
    "ExportValidationError": "jobbert_onnx.export.validate",
}

__all__ = ["ExportValidationError", "UnsupportedModelError", "export_model"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'jobbert_onnx.export' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
