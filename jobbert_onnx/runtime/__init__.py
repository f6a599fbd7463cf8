"""The lean runtime: numpy, tokenizers and onnxruntime only (never torch)."""

from jobbert_onnx.manifest import ManifestError
from jobbert_onnx.runtime.encoder import Encoder
from jobbert_onnx.runtime.sessions import DeviceError
from jobbert_onnx.runtime.tuning import Tuning

__all__ = ["DeviceError", "Encoder", "ManifestError", "Tuning"]
