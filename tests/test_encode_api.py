"""`Encoder.encode` behaves like `SentenceTransformer.encode`: order, batching, shapes, options, errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import assert_close, parity_texts

from jobbert_onnx import DeviceError, Encoder
from jobbert_onnx.runtime.sessions import CUDA, _cuda_blocker


def test_order_is_preserved(encoder_fp32: Encoder) -> None:
    texts = parity_texts()
    shuffled = list(range(len(texts)))
    random.Random(7).shuffle(shuffled)
    straight = encoder_fp32.encode(texts, task="positive", batch_size=5)
    permuted = encoder_fp32.encode([texts[i] for i in shuffled], task="positive", batch_size=5)
    assert_close(permuted, straight[shuffled], 1e-6, "permuted input")


@pytest.mark.parametrize("batch_size", [1, 3, 16, 1000])
def test_batch_size_does_not_change_results(encoder_fp32: Encoder, batch_size: int) -> None:
    texts = parity_texts()
    reference = np.stack([encoder_fp32.encode(t, task="anchor") for t in texts])
    assert_close(
        encoder_fp32.encode(texts, task="anchor", batch_size=batch_size), reference, 1e-5, f"batch {batch_size}"
    )


def test_single_string_gives_one_vector(encoder_fp32: Encoder) -> None:
    vector = encoder_fp32.encode("Software Engineer", task="anchor")
    assert vector.shape == (1024,) and vector.dtype == np.float32
    assert_close(vector, encoder_fp32.encode(["Software Engineer"], task="anchor")[0], 0.0, "single vs list")


def test_empty_list_and_tuple(encoder_fp32: Encoder) -> None:
    assert encoder_fp32.encode([], task="anchor").shape == (0, 1024)
    assert encoder_fp32.encode(("a", "b")).shape == (2, 1024)


def test_normalize_and_truncate_dim(encoder_fp32: Encoder) -> None:
    texts = ["python, sql, data pipelines", "Koch"]
    raw = encoder_fp32.encode(texts, task="positive")
    unit = encoder_fp32.encode(texts, task="positive", normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-6)
    short = encoder_fp32.encode(texts, task="positive", truncate_dim=256, normalize_embeddings=True)
    assert short.shape == (2, 256)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, rtol=1e-6)


def test_similarity_is_cosine(encoder_fp32: Encoder) -> None:
    a = encoder_fp32.encode(["Koch", "Chef"], task="anchor")
    b = encoder_fp32.encode(["cooking, food safety"], task="positive")
    sims = encoder_fp32.similarity(a, b)
    expected = (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(sims, expected, rtol=1e-5)


def test_unknown_task_names_the_valid_ones(encoder_fp32: Encoder) -> None:
    with pytest.raises(ValueError, match="unknown task 'query'; this model has: anchor, positive"):
        encoder_fp32.encode(["x"], task="query")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (None, "got NoneType"),
        (b"bytes", "got bytes"),
        (["ok", 3], r"sentences\[1\] is int"),
        (["ok", ["nested"]], r"sentences\[1\] is list"),
        (["ok", None], r"sentences\[1\] is NoneType"),
        ((t for t in ["a"]), "got generator"),
        (np.array(["a", "b"]), r"ndarray \(convert it with .tolist\(\)\)"),
    ],
)
def test_wrong_input_types_are_refused(encoder_fp32: Encoder, bad: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        encoder_fp32.encode(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"convert_to_tensor": True}, "numpy arrays only"),
        ({"precision": "int8"}, "only 'float32'"),
        ({"output_value": "token_embeddings"}, "only 'sentence_embedding'"),
        ({"batch_size": 0}, "positive integer"),
        ({"truncate_dim": 2000}, r"truncate_dim must be in \[1, 1024\]"),
        ({"device": "cuda"}, r"Encoder.load\(path, device='cuda'\)"),
    ],
)
def test_unsupported_options_are_refused(encoder_fp32: Encoder, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encoder_fp32.encode(["x"], **options)


def test_cuda_that_cannot_load_is_an_error_naming_the_fix(tiny_exports: dict) -> None:
    if _cuda_blocker() is None:
        pytest.skip("CUDA is usable on this machine; the GPU tests cover it")
    with pytest.raises(DeviceError, match=r"pip (uninstall|install)|NVIDIA driver"):
        Encoder.load(tiny_exports[("router", "fp32")], device="cuda")


def test_auto_falls_back_to_cpu_and_says_so(tiny_exports: dict) -> None:
    if _cuda_blocker() is None:
        pytest.skip("CUDA is usable on this machine; auto picks it")
    with pytest.warns(RuntimeWarning, match="runs on the CPU"):
        encoder = Encoder.load(tiny_exports[("router", "fp32")], device="auto")
    assert str(encoder.device) == "cpu"
    assert encoder.chain.encoder.get_providers() == ["CPUExecutionProvider"]
    assert CUDA not in encoder.chain.encoder.get_providers()


def test_unknown_device_is_refused(tiny_exports: dict) -> None:
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        Encoder.load(tiny_exports[("router", "fp32")], device="tpu")
