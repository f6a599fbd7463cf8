"""jobbert-onnx: TechWolf's JobBERT-v3 as ONNX graphs, and a lean runtime to encode with them."""

from jobbert_onnx.loading import Encoder
from jobbert_onnx.runtime import DeviceError, ManifestError, Tuning

__version__ = "0.1.0"

__all__ = ["DeviceError", "Encoder", "ManifestError", "Tuning", "__version__"]
