"""The CUDA path: run where onnxruntime's CUDA provider really loads, skipped elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_close, parity_texts

from jobbert_onnx import Encoder
from jobbert_onnx.export.validate import row_cosines as cosines
from jobbert_onnx.manifest import EMBEDDING, SENTENCE_EMBEDDING, TOKEN_EMBEDDINGS
from jobbert_onnx.runtime.sessions import _cuda_blocker

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_ready() -> None:
    blocker = _cuda_blocker()
    if blocker is not None:
        pytest.skip(f"no usable CUDA here: {blocker}")


def _parity_on_cuda(export: Path, reference: np.ndarray, texts: list[str], task: str) -> np.ndarray:
    encoder = Encoder.load(export, device="cuda")
    assert encoder.precision == "fp16", "fp16 is the CUDA default"
    assert encoder.chain.encoder.get_providers()[0] == "CUDAExecutionProvider"
    got = encoder.encode(texts, task=task)
    cos = cosines(got, reference)
    assert cos.min() >= 0.999 and cos.mean() >= 0.9999, f"{task}: min {cos.min():.6f}, mean {cos.mean():.6f}"
    return got


@pytest.mark.parametrize("task", ["anchor", "positive"])
def test_fp16_on_cuda_matches_fp32_pytorch(
    cuda_ready: None, tiny_exports: dict, st_models: dict[str, Any], task: str
) -> None:
    texts = parity_texts()
    _parity_on_cuda(tiny_exports[("router", "fp16")], st_models["router"].encode(texts, task=task), texts, task)


@pytest.mark.fullsize
@pytest.mark.parametrize("task", ["anchor", "positive"])
def test_full_size_fp16_on_cuda_matches_fp32_pytorch(
    cuda_ready: None, full_model: Path, full_exports: dict[str, Path], task: str
) -> None:
    from sentence_transformers import SentenceTransformer

    texts = parity_texts()
    reference = SentenceTransformer(str(full_model), device="cpu").encode(texts, task=task)
    _parity_on_cuda(full_exports["fp16"], reference, texts, task)


def test_batch_invariance_on_cuda(cuda_ready: None, tiny_exports: dict) -> None:
    encoder = Encoder.load(tiny_exports[("router", "fp16")], device="cuda")
    texts = parity_texts()
    alone = np.stack([encoder.encode(t, task="positive") for t in texts])
    for batch_size in (3, 64):
        assert_close(encoder.encode(texts, task="positive", batch_size=batch_size), alone, 2e-3, f"batch {batch_size}")


def test_intermediates_stay_on_the_gpu(cuda_ready: None, tiny_exports: dict) -> None:
    encoder = Encoder.load(tiny_exports[("router", "fp16")], device="cuda")
    tokenized = encoder.tokenizer.tokenize(["Software Engineer", "python, sql, data pipelines"])
    outputs = encoder.chain.stages(encoder.tokenizer.pad(tokenized, np.arange(2)), "anchor")
    assert outputs[TOKEN_EMBEDDINGS].device_name().lower() == "cuda"
    assert outputs[SENTENCE_EMBEDDING].device_name().lower() == "cuda"
    assert outputs[EMBEDDING].device_name().lower() == "cpu"
