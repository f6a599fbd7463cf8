"""The int8 that sentence-transformers' ONNX backend gives a user, rebuilt without its environment.

`sentence_transformers.backend.export_dynamic_quantized_onnx_model` exports the
transformer to ONNX and quantizes it with Optimum's preset for the CPU (``avx2``: unsigned
8-bit weights, symmetric per column; ``avx512``/``avx512_vnni``: signed 8-bit weights),
activations one scale per tensor, every MatMul (the attention products too). Optimum
needs transformers < 4.58, so the tests rebuild that graph with onnxruntime's quantizer
and the same options from our own trace of the encoder; `python -m benchmarks` runs the
real thing beside it. The rebuilt graph is, if anything, the more faithful of the two (on
the trained MiniLM, AMD EPYC with AVX2: titles at batch 32 mean cosine 0.9913 rebuilt,
0.9897 real; the real export scales queries and keys before their quantized product), so
beating it is the harder test.
"""

from __future__ import annotations

import logging
from pathlib import Path

from jobbert_onnx.export import graphs
from jobbert_onnx.export.source import read_model


def cpu_preset() -> str:
    """Optimum's preset for this CPU, as sentence-transformers' documentation tells users to pick."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    return "avx512" if "avx512f" in flags else "avx2"


def st_onnx_int8(model: Path, out: Path) -> Path:
    """The encoder of `model` quantized as sentence-transformers' ONNX int8 export does on this CPU."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    raw = out.with_name(out.name + ".raw.onnx")
    graphs.export_encoder(read_model(str(model)), raw)
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(
            str(raw),
            str(out),
            per_channel=True,
            weight_type=QuantType.QUInt8 if cpu_preset() == "avx2" else QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            extra_options={
                "WeightSymmetric": True,
                "ActivationSymmetric": False,
                "MatMulConstBOnly": False,
                "DefaultTensorType": TensorProto.FLOAT,
            },
        )
    finally:
        logging.disable(logging.NOTSET)
        raw.unlink(missing_ok=True)
    return out
