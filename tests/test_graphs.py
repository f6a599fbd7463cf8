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


def test_the_word_embedding_table_stays_out_of_the_intermediate_graphs(fused_encoder: Path, tiny_exports: dict) -> None:
    """The traced and fused graphs refer to the table in a file beside them (so the passes' copies of
    them leave it out), onnxruntime runs them as they are, and the fp32 variant takes it back exactly."""
    from jobbert_onnx.export.embedding_table import WORD_EMBEDDINGS_FILE, detached_table

    table_bytes = (fused_encoder.parent / WORD_EMBEDDINGS_FILE).stat().st_size
    assert table_bytes == 250_002 * 32 * 4
    assert fused_encoder.stat().st_size < table_bytes / 4, "the fused graph holds the table"
    graph = onnx.load(str(fused_encoder), load_external_data=False)
    assert detached_table(graph) is not None and detached_table(graph).name.endswith("word_embeddings.weight")
    ids = np.array([[0, 250_001, 17, 2], [0, 5, 2, 1]], dtype=np.int64)
    feeds = {INPUT_IDS: ids, ATTENTION_MASK: (ids != 1).astype(np.int64)}
    fp32 = tiny_exports[("router", "fp32")] / "encoder.fp32.onnx"
    assert detached_table(onnx.load(str(fp32), load_external_data=False)) is None
    assert_close(_session(fused_encoder).run(None, feeds)[0], _session(fp32).run(None, feeds)[0], 1e-5, "fused vs fp32")


def test_the_fp16_variant_is_onnxruntimes_conversion_of_the_whole_graph(tiny_exports: dict) -> None:
    """The table is converted apart (a stand-in goes through the converter): the result must be what the
    converter makes of the whole fp32 graph, initializer for initializer and node for node."""
    from onnx import numpy_helper
    from onnxruntime.transformers.onnx_model import OnnxModel

    folder = tiny_exports[("router", "fp16")]
    whole = onnx.load(str(folder / "encoder.fp32.onnx"))
    graphs.fuse_split_layer_norms(whole)
    graphs.set_attention_mask(whole, graphs.DEFAULT_ATTENTION_MASK["fp16"])
    converted = OnnxModel(whole)
    converted.convert_float_to_float16(keep_io_types=True)
    expected, got = converted.model.graph, onnx.load(str(folder / "encoder.fp16.onnx")).graph
    assert [(n.op_type, list(n.input), list(n.output)) for n in got.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in expected.node
    ]
    assert [t.name for t in got.initializer] == [t.name for t in expected.initializer]
    for mine, theirs in zip(got.initializer, expected.initializer, strict=True):
        a, b = numpy_helper.to_array(mine), numpy_helper.to_array(theirs)
        assert a.dtype == b.dtype and np.array_equal(a, b), mine.name
    assert {v.name: v for v in got.value_info} == {v.name: v for v in expected.value_info}


def test_int8_embeddings_from_the_detached_table_equal_those_from_the_graph(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    from jobbert_onnx.export.embedding_table import WORD_EMBEDDINGS_FILE, refer_to_table
    from jobbert_onnx.export.int8_graph import row_wise_embeddings

    rows, hidden = 40_000, 8  # more rows than one block
    table = np.random.default_rng(0).standard_normal((rows, hidden)).astype(np.float32)
    table[7] = 0.0
    node = helper.make_node("Gather", ["embeddings.word_embeddings.weight", INPUT_IDS], ["looked_up"])
    graph = helper.make_graph(
        [node],
        "lookup",
        [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("looked_up", TensorProto.FLOAT, ["b", "s", hidden])],
        [numpy_helper.from_array(table, "embeddings.word_embeddings.weight")],
    )
    whole = helper.make_model(graph)
    detached = onnx.ModelProto()
    detached.CopyFrom(whole)
    table.tofile(tmp_path / WORD_EMBEDDINGS_FILE)
    refer_to_table(detached, rows, hidden)
    with pytest.raises(ValueError, match="pass the folder"):
        row_wise_embeddings(detached)
    assert row_wise_embeddings(whole) == row_wise_embeddings(detached, tmp_path) == rows
    assert [t.SerializeToString() for t in whole.graph.initializer] == [
        t.SerializeToString() for t in detached.graph.initializer
    ]
