"""The full-size architecture (12 layers, hidden 768, vocab 250,002) with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_close, parity_texts

from jobbert_onnx import Encoder
from jobbert_onnx.export.validate import row_cosines as cosines

pytestmark = pytest.mark.fullsize


def test_full_size_is_fused_once_per_layer(full_exports: dict[str, Path]) -> None:
    for precision, folder in full_exports.items():
        ops = [node.op_type for node in onnx.load(str(folder / "encoder.onnx"), load_external_data=False).graph.node]
        assert ops.count("Attention") == 12, precision
        assert ops.count("SkipLayerNormalization") == 24, precision
        assert ops.count("BiasGelu") == 12, precision
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["architecture"]["layers"] == 12 and manifest["architecture"]["hidden_size"] == 768
        assert manifest["validation"]["passed"]


@pytest.mark.parametrize("task", ["anchor", "positive"])
def test_full_size_matches_sentence_transformers(full_model: Path, full_exports: dict[str, Path], task: str) -> None:
    from sentence_transformers import SentenceTransformer

    texts = parity_texts()
    expected = SentenceTransformer(str(full_model), device="cpu").encode(texts, task=task)
    fp32 = Encoder.load(full_exports["fp32"], device="cpu").encode(texts, task=task)
    assert_close(fp32, expected, 1e-5, f"full-size fp32 {task}")
    fp16 = Encoder.load(full_exports["fp16"], device="cpu").encode(texts, task=task)
    cos = cosines(fp16, expected)
    assert cos.min() >= 0.999 and cos.mean() >= 0.9999, f"fp16 {task}: min {cos.min():.6f} mean {cos.mean():.6f}"
    assert np.isfinite(fp16).all()
