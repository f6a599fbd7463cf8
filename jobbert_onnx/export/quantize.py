"""The int8 encoder for CPUs: dynamic quantization that survives trained models' outlier dimensions.

Plain dynamic quantization gives each activation tensor one int8 scale per batch,
and the word-embedding table one scale in all. Trained encoders have a few hidden
dimensions, and feed-forward units, with values tens to hundreds of times the
others (modelled by `random_model`'s ``outliers=True``): under one scale the other
values keep a few levels, and some texts' vectors come out wrong
(tests/test_quantize.py shows it on the tiny outlier replica). Two measures, chosen by
measurement on the plain and the outlier replicas (benchmarks/RESULTS.md):

- Scale migration, as in SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and
  Efficient Post-Training Quantization for Large Language Models"). For each matrix
  product whose input has outlier channels (the LayerNorm outputs read by the fused
  QKV projection and the first feed-forward layer, the GELU outputs read by the
  second), every input channel j gets ``s_j = max|x_j| ** alpha / max|w_j| ** (1 - alpha)``
  from activations on calibration texts; the input is multiplied by ``1 / s`` and the
  weight's row j by ``s_j``, which is exact in fp32. In this post-LayerNorm encoder
  the LayerNorm output is also the residual stream, so ``1 / s`` cannot be folded into
  the LayerNorm's gain: it is an explicit Mul on the branch into the product. The
  strength alpha is chosen per model by measurement: each of `ALPHAS` is quantized,
  and the one whose mean-pooled outputs on the calibration texts come closest to fp32
  (highest minimum cosine) is kept. The strength matters: on the full-size outlier
  replica the calibration texts' min cosine is 0.9979 at alpha 0.5, 0.9989 at 0.6 and
  0.9880 at 0.7 (benchmarks/RESULTS.md).
- The word-embedding table in int8 with one scale per row (token), applied after the
  lookup, so a few tokens with large values do not set every token's scale.

The position and token-type tables (515 rows in all) stay fp32.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jobbert_onnx.export.graph_edit import topological_sort
from jobbert_onnx.vectors import row_cosines

# Smoothing strengths tried (0.5 is SmoothQuant's default); each costs one quantization.
ALPHAS = (0.5, 0.6, 0.7, 0.8)
# An input is smoothed when its largest channel maximum is this many times the median one;
# below it every channel already shares the scale well, and the Mul would only cost time.
OUTLIER_RATIO = 8.0
_NORMS = ("SkipLayerNormalization", "LayerNormalization")
_GELUS = ("BiasGelu", "Gelu", "FastGelu")


@dataclass(frozen=True)
class Calibration:
    """Texts whose activations set the smoothing scales, and the export's tokenizer to read them."""

    tokenizer: Path
    texts: list[str]

    def batches(self, size: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(input_ids, attention_mask) pairs, padded on the right."""
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(self.tokenizer))
        tokenizer.no_padding()
        ids = [encoding.ids for encoding in tokenizer.encode_batch(self.texts)]
        for start in range(0, len(ids), size):
            chunk = ids[start : start + size]
            width = max(len(row) for row in chunk)
            input_ids = np.ones((len(chunk), width), dtype=np.int64)
            mask = np.zeros_like(input_ids)
            for row, tokens in enumerate(chunk):
                input_ids[row, : len(tokens)] = tokens
                mask[row, : len(tokens)] = 1
            yield input_ids, mask


def write_int8(fused: Path, out: Path, calibration: Calibration, alphas: tuple[float, ...] = ALPHAS) -> dict[str, Any]:
    """Write the int8 encoder from the fused fp32 graph; returns what was applied, for the manifest.

    Args:
        fused: The fused fp32 encoder.
        out: Where to write the int8 encoder.
        calibration: Texts whose activations set the smoothing scales and judge the alphas.
        alphas: Smoothing strengths to try; ``()`` quantizes without smoothing.
    """
    model = onnx.load(str(fused))
    products = _products(model)
    maxima = _channel_maxima(fused, sorted({node.input[0] for node in products}), calibration)
    outliers = {node.name for node in products if _has_outliers(maxima[node.input[0]])}
    del model
    reference = _pooled(fused, calibration)
    tried: dict[str, dict[str, float]] = {}
    best: tuple[float, float] | None = None
    chosen: float | None = None
    rows = 0
    with tempfile.TemporaryDirectory(prefix="jobbert-onnx-int8-", dir=out.parent) as scratch:
        candidates: tuple[float | None, ...] = alphas if outliers and alphas else (None,)
        for alpha in candidates:
            model = onnx.load(str(fused))
            if alpha is not None:
                _smooth(model, maxima, outliers, alpha)
            rows = row_wise_embeddings(model)
            topological_sort(model.graph)
            staged, candidate = Path(scratch) / "staged.onnx", Path(scratch) / "candidate.onnx"
            onnx.save(model, str(staged))
            del model
            quantize_products(staged, candidate)
            cosines = row_cosines(_pooled(candidate, calibration), reference)
            score = (float(cosines.min()), float(cosines.mean()))
            tried[str(alpha)] = {"min_cosine": score[0], "mean_cosine": score[1]}
            if best is None or score > best:
                best, chosen = score, alpha
                candidate.replace(out)
    return {
        "method": "dynamic int8: per-channel weights, per-batch activations",
        "smoothing": {
            "inputs": len(outliers),
            "of": len(products),
            "alpha": chosen,
            "tried": tried,
            "judged_on": f"{len(calibration.texts)} calibration texts, mean-pooled outputs against fp32",
        },
        "word_embeddings": f"int8, one scale per row ({rows} rows)" if rows else "fp32",
    }


def _has_outliers(peak: np.ndarray) -> bool:
    return bool(peak.max() >= OUTLIER_RATIO * float(np.median(np.maximum(peak, 1e-5))))


def _pooled(encoder: Path, calibration: Calibration) -> np.ndarray:
    """Mean-pooled token embeddings of the calibration texts through one encoder graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(encoder), options, providers=["CPUExecutionProvider"])
    pooled = []
    for input_ids, mask in calibration.batches():
        tokens = session.run(None, {"input_ids": input_ids, "attention_mask": mask})[0]
        pooled.append((tokens * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))
    return np.concatenate(pooled)


def _products(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The QKV projections and feed-forward products that read LayerNorm or GELU outputs."""
    producers = {output: node for node in model.graph.node for output in node.output}
    found = []
    for node in model.graph.node:
        source = producers.get(node.input[0]) if node.input else None
        if source is None:
            continue
        if (node.op_type == "Attention" and source.op_type in _NORMS) or (
            node.op_type == "MatMul" and source.op_type in (*_NORMS, *_GELUS)
        ):
            found.append(node)
    return found


def _channel_maxima(fused: Path, names: list[str], calibration: Calibration) -> dict[str, np.ndarray]:
    """Largest |value| of every channel of the named tensors over the calibration texts' real tokens."""
    import onnxruntime as ort

    model = onnx.load(str(fused))
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del model
    maxima: dict[str, np.ndarray] = {}
    for input_ids, mask in calibration.batches():
        outputs = session.run(names, {"input_ids": input_ids, "attention_mask": mask})
        for name, value in zip(names, outputs, strict=True):
            found = np.abs(value[mask == 1]).max(0)
            maxima[name] = np.maximum(maxima[name], found) if name in maxima else found
    return maxima


def _smooth(model: onnx.ModelProto, maxima: dict[str, np.ndarray], names: set[str], alpha: float) -> None:
    """Migrate the named products' input outliers into their weights, in place."""
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    for index, node in enumerate(node for node in _products(model) if node.name in names):
        peak = np.maximum(maxima[node.input[0]], 1e-5)
        weight = numpy_helper.to_array(weights[node.input[1]])
        scale = (peak**alpha / np.maximum(np.abs(weight).max(1), 1e-5) ** (1 - alpha)).astype(np.float32)
        weights[node.input[1]].CopyFrom(numpy_helper.from_array(weight * scale[:, None], node.input[1]))
        inverse, scaled = f"smooth_{index}_inverse", f"{node.input[0]}_smoothed_{index}"
        model.graph.initializer.append(numpy_helper.from_array((1 / scale).astype(np.float32), inverse))
        model.graph.node.append(helper.make_node("Mul", [node.input[0], inverse], [scaled], name=f"smooth_{index}"))
        node.input[0] = scaled


def row_wise_embeddings(model: onnx.ModelProto) -> int:
    """Store the word-embedding table as int8 with a scale per row, in place; returns its rows (0: none found)."""
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Gather" or "word_embeddings" not in node.input[0] or node.input[0] not in weights:
            continue
        table = numpy_helper.to_array(weights[node.input[0]])
        scale = (np.maximum(np.abs(table).max(1), 1e-12) / 127).astype(np.float32)
        quantized = np.clip(np.round(table / scale[:, None]), -127, 127).astype(np.int8)
        name, ids, looked_up = node.input[0], node.input[1], node.output[0]
        weights[name].CopyFrom(numpy_helper.from_array(quantized, f"{name}_int8"))
        model.graph.initializer.append(numpy_helper.from_array(scale[:, None], f"{name}_row_scale"))
        node.input[0], node.output[0] = f"{name}_int8", f"{looked_up}_int8"
        model.graph.node.extend(
            [
                helper.make_node("Gather", [f"{name}_row_scale", ids], [f"{looked_up}_scale"]),
                helper.make_node("Cast", [f"{looked_up}_int8"], [f"{looked_up}_unscaled"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{looked_up}_unscaled", f"{looked_up}_scale"], [looked_up]),
            ]
        )
        return int(table.shape[0])
    return 0


def quantize_products(source: Path, out: Path, op_types: tuple[str, ...] = ("MatMul", "Attention")) -> None:
    """Dynamic per-channel int8 for every MatMul and the fused Attention (which becomes QAttention).

    `op_types` narrows it (``("MatMul",)`` keeps the fused Attention in fp32), for measuring each choice.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer logs a generic pre-processing hint on the root logger; the
    # graph is already optimized, so the hint does not apply.
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(
            str(source),
            str(out),
            per_channel=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types),
            # The fused contrib ops carry no type information for shape inference.
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )
    finally:
        logging.disable(logging.NOTSET)
