"""The exported graphs themselves: NaN-safe pooling, and the Attention mask forms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import assert_close

from jobbert_onnx.errors import SetupError
from jobbert_onnx.export import graphs
from jobbert_onnx.manifest import ATTENTION_MASK, INPUT_IDS, POOLING_FILE, TOKEN_EMBEDDINGS


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf, 1e38])
def test_nothing_at_a_masked_position_reaches_a_vector(tiny_exports: dict, poison: float) -> None:
    pooling = _session(tiny_exports[("router", "fp32")] / POOLING_FILE)
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((4, 6, 32)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=np.int64)
    clean = pooling.run(None, {TOKEN_EMBEDDINGS: hidden, ATTENTION_MASK: mask})[0]
    poisoned = hidden.copy()
    poisoned[mask == 0] = poison  # what a GPU attention kernel may leave at padded positions
    got = pooling.run(None, {TOKEN_EMBEDDINGS: poisoned, ATTENTION_MASK: mask})[0]
    assert np.isfinite(got).all(), f"{poison} at masked positions reached a vector"
    assert_close(got, clean, 0.0, f"rows with {poison} at masked positions")
    expected = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
    assert_close(clean, expected, 1e-6, "mean over real tokens")
    assert not got[3].any(), "an all-padding row pools to zeros, as sentence-transformers' clamp gives"


def test_nan_at_a_real_position_is_not_hidden(tiny_exports: dict) -> None:
    pooling = _session(tiny_exports[("router", "fp32")] / POOLING_FILE)
    hidden = np.ones((1, 3, 32), dtype=np.float32)
    hidden[0, 1, 0] = np.nan
    got = pooling.run(None, {TOKEN_EMBEDDINGS: hidden, ATTENTION_MASK: np.ones((1, 3), dtype=np.int64)})[0]
    assert np.isnan(got[0, 0]) and np.isfinite(got[0, 1:]).all()


@pytest.fixture(scope="module")
def fused_encoder(tiny_models: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from jobbert_onnx.export.source import read_model

    spec = read_model(str(tiny_models["router"]), None, False)
    folder = tmp_path_factory.mktemp("fused")
    graphs.export_encoder(spec, folder / "raw.onnx")
    graphs.fuse_encoder(folder / "raw.onnx", folder / "fused.onnx", spec)
    return folder / "fused.onnx"


def _mask_source(path: Path) -> str:
    model = onnx.load(str(path))
    producers = {output: node for node in model.graph.node for output in node.output}
    masks = {node.input[3] for node in model.graph.node if node.op_type == "Attention"}
    assert len(masks) == 1, masks
    return producers[masks.pop()].op_type


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_attention_mask_form_gives_the_same_tokens(fused_encoder: Path, tmp_path: Path, precision: str) -> None:
    rng = np.random.default_rng(1)
    lengths = np.array([12, 3, 7, 2, 12])
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(5, 5000, mask.shape), 1)
    other_padding = np.where(mask == 1, ids, rng.integers(5, 5000, mask.shape))
    outputs = {}
    for form, producer in (("lengths", "ReduceSum"), ("lengths-starts", "Concat"), ("2d", "Cast")):
        path = tmp_path / f"{form}.onnx"
        graphs.write_variant(fused_encoder, path, precision, form)
        assert _mask_source(path) == producer, form
        session = _session(path)
        outputs[form] = session.run(None, {INPUT_IDS: ids, ATTENTION_MASK: mask})[0]
        # Masking is real in every form: what sits at padded positions changes no real token.
        shifted = session.run(None, {INPUT_IDS: other_padding, ATTENTION_MASK: mask})[0]
        for row, length in enumerate(lengths):
            assert_close(shifted[row, :length], outputs[form][row, :length], 1e-5, f"{form} row {row}")
    for form in ("lengths-starts", "2d"):
        for row, length in enumerate(lengths):
            assert_close(outputs[form][row, :length], outputs["lengths"][row, :length], 1e-5, f"{form} row {row}")


def test_unknown_mask_form_is_refused(fused_encoder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown attention mask form 'bool'; choose from: lengths, lengths-starts"):
        graphs.write_variant(fused_encoder, tmp_path / "x.onnx", "fp16", "bool")


def test_a_graph_without_fused_attention_is_refused() -> None:
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "plain",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    with pytest.raises(SetupError, match="do not share one ReduceSum mask input"):
        graphs.set_attention_mask(model, "2d")
