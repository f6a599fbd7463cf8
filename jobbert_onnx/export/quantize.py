"""The int8 encoder for CPUs: per-token int8 that survives trained models' outliers.

The graph (`int8_graph`): every matrix product in int8, weights with one scale per
output column (7 bits, so no CPU's int8 kernel saturates), activations with one scale
per token, so a text's vector never depends on what it is batched with, and one
outlier token (trained encoders' first token) costs only itself. The word-embedding
table is int8 with one scale per row.

Trained encoders also have a few hidden dimensions with values tens to hundreds of
times the others (modelled by `random_model`'s ``outliers=True``), which a per-token
scale shares with every other channel of the token. For the products whose input has
such channels (the LayerNorm outputs read by the QKV projection and the first
feed-forward layer, the GELU outputs read by the second), scale migration as in
SmoothQuant (Xiao et al. 2023) helps: every input channel j gets
``s_j = max|x_j| ** alpha / max|w_j| ** (1 - alpha)`` from activations on calibration
texts; the input is multiplied by ``1 / s`` and the weight's row j by ``s_j``, exact in
fp32. In this post-LayerNorm encoder the LayerNorm output is also the residual stream,
so ``1 / s`` is an explicit Mul on the branch into the product. Whether to smooth, and
how strongly, is chosen per model by measurement: no smoothing and each of `ALPHAS`
are quantized, and the one whose mean-pooled outputs on the calibration texts come
closest to fp32 (highest minimum cosine, then mean) is kept.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jobbert_onnx.export.int8_graph import (
    ACTIVATION_LEVELS,
    WEIGHT_LEVELS,
    flatten_tokens,
    per_token_products,
    row_wise_embeddings,
    split_attention,
)
from jobbert_onnx.runtime.memory import trim_heap
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
        pad = tokenizer.padding["pad_id"] if tokenizer.padding else 0
        tokenizer.no_padding()
        ids = [encoding.ids for encoding in tokenizer.encode_batch(self.texts)]
        for start in range(0, len(ids), size):
            chunk = ids[start : start + size]
            width = max(len(row) for row in chunk)
            input_ids = np.full((len(chunk), width), pad, dtype=np.int64)
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
        alphas: Smoothing strengths to try beside none; ``()`` quantizes without smoothing.
    """
    model = onnx.load(str(fused), load_external_data=False)
    products = _products(model)
    maxima = _channel_maxima(fused, sorted({node.input[0] for node in products}), calibration)
    outliers = {node.name for node in products if _has_outliers(maxima[node.input[0]])}
    del model
    reference = _pooled(fused, calibration)
    tried: dict[str, dict[str, float]] = {}
    best: tuple[float, float] | None = None
    chosen: float | None = None
    facts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="jobbert-onnx-int8-", dir=out.parent) as scratch:
        candidates: tuple[float | None, ...] = (None, *alphas) if outliers else (None,)
        for alpha in candidates:
            model = onnx.load(str(fused), load_external_data=False)
            if alpha is not None:
                _smooth(model, maxima, outliers, alpha)
            facts = {
                "word_embedding_rows": row_wise_embeddings(model, fused.parent),
                "attention_split": split_attention(model),
            }
            flatten_tokens(model)
            facts["products"] = per_token_products(model)
            candidate = Path(scratch) / "candidate.onnx"
            onnx.save(model, str(candidate))
            del model
            trim_heap()  # so that the candidates' graphs do not pile up in the C heap
            cosines = row_cosines(_pooled(candidate, calibration), reference)
            score = (float(cosines.min()), float(cosines.mean()))
            tried[str(alpha)] = {"min_cosine": score[0], "mean_cosine": score[1]}
            if best is None or score > best:
                best, chosen = score, alpha
                candidate.replace(out)
    rows = facts["word_embedding_rows"]
    return {
        "method": (
            f"int8 matrix products ({facts['products']}): weights per output column in [-{WEIGHT_LEVELS}, "
            f"{WEIGHT_LEVELS}], activations per token in [-{ACTIVATION_LEVELS}, {ACTIVATION_LEVELS}]; "
            "attention scores fp32"
        ),
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

    model = onnx.load(str(fused), load_external_data=False)
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # From a file beside `fused`, where the word-embedding table it may refer to is.
    with tempfile.NamedTemporaryFile(suffix=".onnx", dir=fused.parent) as probe:
        onnx.save(model, probe.name)
        del model
        session = ort.InferenceSession(probe.name, options, providers=["CPUExecutionProvider"])
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
