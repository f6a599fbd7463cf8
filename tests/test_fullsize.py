"""The full-size architecture (12 layers, hidden 768, vocab 250,002) with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FULL_EXPORT_RUN, assert_close, parity_texts

from jobbert_onnx import Encoder
from jobbert_onnx.manifest import encoder_file
from jobbert_onnx.vectors import row_cosines as cosines

pytestmark = pytest.mark.fullsize


# The default export's peak resident memory (ru_maxrss): about 3.5x the 1.1 GB of fp32 weights.
EXPORT_PEAK_BYTES = 4e9


def test_the_default_full_size_export_peaks_under_4_gb(full_exports: dict[str, Path]) -> None:
    if not FULL_EXPORT_RUN:
        pytest.skip("the export was given (--full-export), so its memory was not measured here")
    peak = FULL_EXPORT_RUN["peak_bytes"]
    steps = ", ".join(f"{step['step'][:40]!r}: {step['peak_gib']} GiB" for step in FULL_EXPORT_RUN["steps"])
    assert peak <= EXPORT_PEAK_BYTES, f"the full-size export peaked at {peak / 1e9:.2f} GB; by step: {steps}"


def test_full_size_is_fused_once_per_layer(full_exports: dict[str, Path]) -> None:
    for precision, folder in full_exports.items():
        graph = onnx.load(str(folder / encoder_file(precision)), load_external_data=False).graph
        ops = [node.op_type for node in graph.node]
        assert ops.count("MultiHeadAttention" if precision == "int8" else "Attention") == 12, precision
        split = precision != "fp16"  # the CPU variants run Add + LayerNormalization instead
        assert ops.count("SkipLayerNormalization") == (0 if split else 24), precision
        assert ops.count("LayerNormalization") == (25 if split else 1), precision
        assert ops.count("BiasGelu") == 12, precision
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["architecture"]["layers"] == 12 and manifest["architecture"]["hidden_size"] == 768
        assert manifest["validation"]["passed"]


@pytest.mark.parametrize("task", ["anchor", "positive"])
def test_full_size_matches_sentence_transformers(full_model: Path, full_exports: dict[str, Path], task: str) -> None:
    from sentence_transformers import SentenceTransformer

    texts = parity_texts()
    expected = SentenceTransformer(str(full_model), device="cpu").encode(texts, task=task)
    fp32 = Encoder.load(full_exports["fp32"], device="cpu", precision="fp32").encode(texts, task=task)
    assert_close(fp32, expected, 1e-5, f"full-size fp32 {task}")
    with pytest.warns(RuntimeWarning, match="fp16 variant on the CPU"):
        fp16 = Encoder.load(full_exports["fp16"], device="cpu", precision="fp16").encode(texts, task=task)
    cos = cosines(fp16, expected)
    assert cos.min() >= 0.999 and cos.mean() >= 0.9999, f"fp16 {task}: min {cos.min():.6f} mean {cos.mean():.6f}"
    assert np.isfinite(fp16).all()
    int8 = Encoder.load(full_exports["int8"], device="cpu")
    assert int8.precision == "int8", "the CPU default is the fastest variant, int8"
    cos = cosines(int8.encode(texts, task=task), expected)
    assert cos.min() >= 0.98 and cos.mean() >= 0.995, f"int8 {task}: min {cos.min():.6f} mean {cos.mean():.6f}"
