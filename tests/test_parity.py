"""export -> load -> encode gives sentence-transformers' vectors, for both heads, layouts and precisions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_close, parity_texts

from jobbert_onnx import Encoder
from jobbert_onnx.vectors import row_cosines as cosines

# fp32 is the exact variant; fp16 runs the encoder in half precision; int8 is
# dynamically quantized and held to the export's bar (min 0.97, mean 0.99).
FP32_ATOL = 1e-5
FP32_MIN_COSINE = 0.99999
FP16_MIN_COSINE = 0.999


@pytest.mark.parametrize("layout", ["router", "legacy-asym"])
@pytest.mark.parametrize("task", ["anchor", "positive"])
def test_fp32_matches_sentence_transformers(
    tiny_exports: dict[tuple[str, str], Path], st_models: dict[str, Any], layout: str, task: str
) -> None:
    texts = parity_texts()
    expected = st_models[layout].encode(texts, task=task, batch_size=8)
    encoder = Encoder.load(tiny_exports[(layout, "fp32")], device="cpu", precision="fp32")
    got = encoder.encode(texts, task=task, batch_size=8)
    assert got.shape == expected.shape == (len(texts), 1024)
    assert got.dtype == np.float32
    assert_close(got, expected, FP32_ATOL, f"{layout}/{task} fp32")
    assert cosines(got, expected).min() >= FP32_MIN_COSINE


@pytest.mark.parametrize("task", ["anchor", "positive"])
def test_fp16_matches_sentence_transformers(
    tiny_exports: dict[tuple[str, str], Path], st_models: dict[str, Any], task: str
) -> None:
    texts = parity_texts()
    expected = st_models["router"].encode(texts, task=task)
    with pytest.warns(RuntimeWarning, match="fp16 variant on the CPU"):
        got = Encoder.load(tiny_exports[("router", "fp16")], device="cpu", precision="fp16").encode(texts, task=task)
    worst = int(np.argmin(cosines(got, expected)))
    assert cosines(got, expected)[worst] >= FP16_MIN_COSINE, f"worst text {texts[worst]!r}"


@pytest.mark.parametrize("task", ["anchor", "positive"])
def test_int8_matches_sentence_transformers(
    tiny_exports: dict[tuple[str, str], Path], st_models: dict[str, Any], task: str
) -> None:
    texts = parity_texts()
    expected = st_models["router"].encode(texts, task=task)
    encoder = Encoder.load(tiny_exports[("router", "int8")], device="cpu", precision="int8")
    assert encoder.chain.encoder.get_inputs()[0].name == "input_ids"
    cos = cosines(encoder.encode(texts, task=task), expected)
    assert cos.min() >= 0.98 and cos.mean() >= 0.995, f"min {cos.min():.6f} mean {cos.mean():.6f}"
    assert cos.min() < 1.0 - 1e-7, "int8 vectors equal fp32 ones exactly: the quantized graph did not run"


def test_default_task_is_the_routers_default(encoder_fp32: Encoder, st_models: dict[str, Any]) -> None:
    texts = ["Software Engineer", "Produktmanager"]
    assert encoder_fp32.default_task == "anchor"
    assert_close(encoder_fp32.encode(texts), encoder_fp32.encode(texts, task="anchor"), 0.0, "task=None vs anchor")
    assert_close(encoder_fp32.encode(texts), st_models["router"].encode(texts), FP32_ATOL, "task=None vs ST")


def test_parity_inputs_are_discriminative(encoder_fp32: Encoder) -> None:
    """Parity at these tolerances means something only if different texts give clearly different vectors."""
    texts = [t for t in parity_texts() if t.strip()]
    for task in encoder_fp32.tasks:
        vectors = encoder_fp32.encode(texts, task=task, normalize_embeddings=True)
        sims = vectors @ vectors.T
        np.fill_diagonal(sims, -1.0)
        assert sims.max() < 0.999, f"two different texts give near-identical {task} vectors ({sims.max():.5f})"
    anchor = encoder_fp32.encode(texts, task="anchor", normalize_embeddings=True)
    positive = encoder_fp32.encode(texts, task="positive", normalize_embeddings=True)
    assert np.abs((anchor * positive).sum(1)).max() < 0.9, "the two heads give near-identical vectors"
