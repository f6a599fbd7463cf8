"""The int8 graph: exact per-token int8 arithmetic on every CPU, and vectors that do not depend on the batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from jobbert_onnx import Encoder, Tuning, samples
from jobbert_onnx.export import int8_graph
from jobbert_onnx.manifest import encoder_file
from jobbert_onnx.vectors import row_cosines


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_int8_weights_cannot_saturate_a_16_bit_pair_sum() -> None:
    """x86 CPUs without VNNI add two u8 x s8 products into 16 bits with saturation (vpmaddubsw)."""
    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    weight[3, 5] = 40.0  # an outlier sets its column's scale
    quantized, scale = int8_graph.quantize_weight(weight)
    assert quantized.dtype == np.int8 and np.abs(quantized).max() == int8_graph.WEIGHT_LEVELS
    largest_activation = int8_graph.ACTIVATION_LEVELS + 128  # u8, zero point 128
    assert 2 * largest_activation * int8_graph.WEIGHT_LEVELS < 2**15
    np.testing.assert_allclose(quantized * scale, weight, atol=float(scale.max()) / 2 + 1e-7)


def test_per_token_products_compute_exact_int8_arithmetic() -> None:
    """onnxruntime's result equals int8 arithmetic done by hand: no kernel on this CPU saturates, and each
    row is quantized with its own scale (a row 1,000 times larger does not coarsen the others)."""
    rng = np.random.default_rng(1)
    k, n = 768, 256
    weight = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    x = rng.standard_normal((7, k)).astype(np.float32)
    x[2] *= 1000.0
    x[4] = 0.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "product",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert int8_graph.per_token_products(model) == 1
    got = _session(model).run(None, {"x": x})[0]

    quantized, weight_scale = int8_graph.quantize_weight(weight)
    row_scale = np.abs(x).max(1, keepdims=True) / int8_graph.ACTIVATION_LEVELS
    levels = np.clip(np.round(x / np.where(row_scale > 0, row_scale, 1)), -127, 127)
    by_hand = (levels @ quantized.astype(np.float64)) * weight_scale * row_scale
    np.testing.assert_allclose(got, by_hand, rtol=1e-5, atol=1e-5 * float(np.abs(by_hand).max(1).min()))
    assert not got[4].any(), "a row of zeros stays zero"
    exact = x @ weight
    relative = np.abs(got - exact).max(1) / np.abs(exact).max(1).clip(1e-12)
    assert relative[[0, 1, 3, 5, 6]].max() < 0.05 and relative[2] < 0.05, relative


def test_flattening_the_tokens_changes_no_value(tiny_exports: dict) -> None:
    folder = tiny_exports[("router", "fp32")]
    model = onnx.load(str(folder / encoder_file("fp32")))
    before = _session(model)
    assert int8_graph.split_attention(model) == 2
    int8_graph.flatten_tokens(model)
    after = _session(model)
    ids = np.array([[0, 35, 1294, 2, 1, 1], [0, 9, 22, 31, 44, 2]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}
    expected, got = before.run(None, feed)[0], after.run(None, feed)[0]
    assert got.shape == expected.shape == (2, 6, 32)
    np.testing.assert_allclose(got, expected, atol=2e-5)


def _workload() -> list[str]:
    """Mixed lengths: one-token inputs, titles in four languages, skill lists up to and past the cap."""
    texts = ["a", "CEO", "数", ""]
    for language in samples.LANGUAGES:
        texts += samples.titles(language)[11::173][:6]
    for language in samples.SKILL_LANGUAGES:
        texts += samples.skill_lists(language, count=2, skills_per_list=5, offset=60)
        texts += samples.skill_lists(language, count=1, skills_per_list=30, offset=600)
    return texts


WORKLOAD = _workload()


@pytest.fixture(scope="module")
def int8_encoders(tiny_exports: dict, trained_export: Path) -> dict[str, Encoder]:
    plain = Tuning(dedup=False)
    return {
        "tiny int8": Encoder.load(tiny_exports[("router", "int8")], device="cpu", precision="int8", tuning=plain),
        "trained int8": Encoder.load(trained_export, device="cpu", precision="int8", tuning=plain),
    }


@pytest.fixture(scope="module")
def alone(int8_encoders: dict[str, Encoder]) -> dict[tuple[str, str], np.ndarray]:
    """Each workload text encoded on its own: no neighbours, no padding."""
    return {
        (name, task): np.stack([encoder.encode([text], task=task)[0] for text in WORKLOAD])
        for name, encoder in int8_encoders.items()
        for task in ("anchor", "positive")
    }


@settings(max_examples=12, deadline=None)
@given(
    order=st.permutations(range(len(WORKLOAD))),
    batch_size=st.sampled_from([2, 5, 16, 64]),
    task=st.sampled_from(["anchor", "positive"]),
)
def test_a_texts_int8_vector_does_not_depend_on_its_batch(
    int8_encoders: dict[str, Encoder],
    alone: dict[tuple[str, str], np.ndarray],
    order: list[int],
    batch_size: int,
    task: str,
) -> None:
    """Every text of a mixed-length workload, alone and inside batches of other texts and padding:
    cosine >= 0.99999 (the dedup, the server's batching and embed's chunks rely on it)."""
    texts = [WORKLOAD[i] for i in order]
    for name, encoder in int8_encoders.items():
        batched = encoder.encode(texts, task=task, batch_size=batch_size)
        cosines = row_cosines(batched, alone[(name, task)][order])
        worst = int(np.argmin(cosines))
        assert cosines.min() >= 0.99999, f"{name}: {texts[worst]!r} alone vs batched: cosine {cosines.min():.7f}"
