"""The exporter: JobBERT-v3 (hub id or folder) -> validated ONNX graphs. Needs `jobbert-onnx[export]`."""

from jobbert_onnx.export.pipeline import export_model
from jobbert_onnx.export.source import UnsupportedModelError
from jobbert_onnx.export.validate import ExportValidationError

__all__ = ["ExportValidationError", "UnsupportedModelError", "export_model"]
