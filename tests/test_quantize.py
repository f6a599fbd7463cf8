"""int8 that survives trained models' outlier dimensions, proven on replicas that have them."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import parity_texts
from safetensors.numpy import load_file

from jobbert_onnx import Encoder, samples
from jobbert_onnx.export import export_model
from jobbert_onnx.export import random_model as rm
from jobbert_onnx.export.quantize import ALPHAS
from jobbert_onnx.manifest import encoder_file, sha256_file
from jobbert_onnx.vectors import row_cosines


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def outlier_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("outliers")
    model = rm.build_random_model(root / "model", size="tiny", seed=3, outliers=True)
    export_model(str(model), root / "export", precision="fp32,int8", validate_device="cpu", log=_quiet)
    return model, root / "export"


def test_the_outlier_replica_has_the_pathologies_of_trained_encoders(outlier_export: tuple[Path, Path]) -> None:
    model, _ = outlier_export
    weights = load_file(str(model / "model.safetensors"))
    gains = weights["embeddings.LayerNorm.weight"]
    dims = np.flatnonzero(gains == rm.OUTLIER_LN_GAIN)
    pad = np.flatnonzero(gains == rm.PAD_LN_GAIN)
    assert len(dims) == rm.OUTLIER_DIMS and len(pad) == 1 and np.allclose(np.delete(gains, [*dims, *pad]), 1.0)
    for name, value in weights.items():
        if name.endswith("LayerNorm.weight"):
            assert np.array_equal(np.flatnonzero(value == rm.OUTLIER_LN_GAIN), dims), name
    words = weights["embeddings.word_embeddings.weight"]
    assert words[rm.PAD_TOKEN, pad] == rm.PAD_MARKER and np.count_nonzero(words[:, pad]) == 1, "only <pad> marks it"
    first = np.flatnonzero(words[rm.FIRST_TOKEN] == rm.FIRST_MARKER)
    assert len(first) == rm.FIRST_DIMS and np.count_nonzero(words[:, first]) == rm.FIRST_DIMS, "only <s> marks these"
    assert np.all(words[list(rm.DELIMITERS)][:, dims] == rm.OUTLIER_MARKER)
    assert np.all(words[rm.FIRST_TOKEN, dims] == -rm.OUTLIER_MARKER), "<s> sits far below the delimiters' switch"
    others = np.delete(words, [*rm.DELIMITERS, rm.FIRST_TOKEN], axis=0)[:, dims]
    assert np.all(np.abs(others) == np.float32(rm.OUTLIER_SEED)), "every sign decided, none near zero"
    assert not np.any(np.all(others > 0, axis=1)), "only delimiters have every sign positive"
    assert np.all(np.any(others > 0, axis=0)), "each dimension has both signs"
    assert not weights["embeddings.position_embeddings.weight"][:, dims].any()
    last = max(int(name.split(".")[2]) for name in weights if name.startswith("encoder.layer."))
    down = weights[f"encoder.layer.{last}.output.dense.weight"]
    assert (down[dims] == rm.OUTLIER_OUT_WEIGHT).sum() == rm.OUTLIER_DIMS * rm.OUTLIER_UNITS, "late FFN writes them"
    head = load_file(str(model / "2_Router" / "anchor_0_Dense" / "model.safetensors"))["linear.weight"]
    assert np.abs(head[:, dims]).max() < np.abs(np.delete(head, dims, axis=1)).max() / 50


def test_the_outlier_replica_singles_out_the_first_token_and_padding(outlier_export: tuple[Path, Path]) -> None:
    """Trained encoders' token outliers: the first token's early feed-forward outputs far above the
    median, and padded positions beyond every real token at the embeddings' LayerNorm and at GELU."""
    import torch
    from transformers import AutoTokenizer, XLMRobertaModel

    model, _ = outlier_export
    encoder = XLMRobertaModel.from_pretrained(str(model)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    caught: dict[str, torch.Tensor] = {}
    first = encoder.encoder.layer[0]
    encoder.embeddings.LayerNorm.register_forward_hook(lambda _m, _i, out: caught.__setitem__("norm", out))
    first.output.dense.register_forward_hook(lambda _m, _i, out: caught.__setitem__("ffn", out))
    first.intermediate.register_forward_hook(lambda _m, _i, out: caught.__setitem__("gelu", out))
    texts = samples.titles("en")[:24] + samples.skill_lists("en", count=8, skills_per_list=8)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        encoder(**batch)
    real = batch["attention_mask"].bool()
    assert (~real).any(), "the batch has padding"
    starts = torch.zeros_like(real)
    starts[:, 0] = True
    ffn = caught["ffn"].abs()
    assert ffn[starts].max() > 100 * ffn[real & ~starts].median(), "the first token's feed-forward output"
    for name, factor in (("norm", 4.0), ("gelu", 10.0)):
        values = caught[name].abs()
        assert values[~real].max() > factor * values[real].max(), f"padded positions at {name}"


def test_only_delimiters_trip_the_outlier_replicas_switch(outlier_export: tuple[Path, Path]) -> None:
    """Every other token sits far below the late-layer units that write the delimiters' hundreds.

    A token on the edge of that switch (pre-activation near 0) would make the replica's
    fp32 output jump under a 1% change of any weight, a tail no quantizer could avoid
    and no trained model shows.
    """
    import torch
    from transformers import AutoTokenizer, XLMRobertaModel

    model, _ = outlier_export
    encoder = XLMRobertaModel.from_pretrained(str(model)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    level = rm.outlier_level(encoder.config.hidden_size)
    caught: list = []
    for layer in encoder.encoder.layer:
        up = layer.intermediate.dense
        units = (up.bias == -np.float32(level)).nonzero().flatten()
        if len(units):
            up.register_forward_hook(lambda _m, _i, out, units=units: caught.append(out[..., units]))
    texts = samples.validation_sample()
    content, delimiters = [], []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer([text], return_tensors="pt", truncation=True, max_length=64)
            caught.clear()
            encoder(**ids)
            assert caught, "the replica has switch units"
            is_delimiter = torch.isin(ids["input_ids"][0], torch.tensor(rm.DELIMITERS))
            for z in caught:
                content.append(z[0][~is_delimiter].max())
                delimiters.append(z[0][is_delimiter].min())
    assert max(content) < -3.0 < 3.0 < min(delimiters), (float(max(content)), float(min(delimiters)))


def test_int8_stays_faithful_where_plain_dynamic_int8_drops(outlier_export: tuple[Path, Path], tmp_path: Path) -> None:
    """Plain dynamic int8 (one scale per tensor, the embedding table included) is what a user gets from
    onnxruntime's quantizer, as sentence-transformers' and Optimum's int8 do."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from sentence_transformers import SentenceTransformer

    model, export = outlier_export
    plain = tmp_path / "plain"
    shutil.copytree(export, plain)
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(
            str(export / encoder_file("fp32")),
            str(plain / encoder_file("int8")),
            per_channel=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Attention", "Gather"],
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )
    finally:
        logging.disable(logging.NOTSET)
    manifest = json.loads((plain / "manifest.json").read_text())
    replaced = plain / encoder_file("int8")
    manifest["files"][replaced.name] = {"sha256": sha256_file(replaced), "size": replaced.stat().st_size}
    (plain / "manifest.json").write_text(json.dumps(manifest))
    texts = parity_texts() + samples.skill_lists("en", count=10, skills_per_list=12, offset=700)
    reference = SentenceTransformer(str(model), device="cpu").encode(texts, task="positive")
    ours = row_cosines(Encoder.load(export, device="cpu", precision="int8").encode(texts, task="positive"), reference)
    naive = row_cosines(Encoder.load(plain, device="cpu", precision="int8").encode(texts, task="positive"), reference)
    assert ours.min() >= 0.98 and ours.mean() >= 0.995, f"ours: min {ours.min():.6f} mean {ours.mean():.6f}"
    assert 1 - naive.min() > 10 * (1 - ours.min()), f"plain min {naive.min():.6f} vs ours {ours.min():.6f}"


def test_the_manifest_records_how_int8_was_made(outlier_export: tuple[Path, Path], tiny_exports: dict) -> None:
    _, export = outlier_export
    smoothing = json.loads((export / "manifest.json").read_text())["variants"]["int8"]["quantization"]["smoothing"]
    assert smoothing["inputs"] > 0
    assert set(smoothing["tried"]) == {"None", *(str(a) for a in ALPHAS)}, "no smoothing and every alpha measured"
    best = max(smoothing["tried"].values(), key=lambda t: (t["min_cosine"], t["mean_cosine"]))
    assert smoothing["tried"][str(smoothing["alpha"])] == best, "the best-measured alpha is kept"
    plain = json.loads((tiny_exports[("router", "int8")] / "manifest.json").read_text())["variants"]["int8"]
    assert plain["quantization"]["smoothing"]["inputs"] == 0, "without outliers nothing is smoothed"
    assert list(plain["quantization"]["smoothing"]["tried"]) == ["None"], "and it is quantized once"
    assert plain["quantization"]["word_embeddings"] == "int8, one scale per row (250002 rows)"


@pytest.mark.fullsize
def test_full_size_outlier_replica_int8_passes_its_gate(tmp_path: Path) -> None:
    """The full-size replica with outliers, exported with the default precisions.

    Its int8 is smoothed (the outlier inputs found by calibration) and meets the gate on
    all 630 validation texts, both heads: a user exporting weights with trained models'
    outlier dimensions gets the CPU variant, not only fp16.
    """
    model = rm.build_random_model(tmp_path / "model", size="full", seed=0, outliers=True)
    manifest = export_model(str(model), tmp_path / "export", validate_device="cpu", log=_quiet)
    assert list(manifest["variants"]) == ["fp16", "int8"] and not manifest.get("dropped")
    int8 = manifest["variants"]["int8"]
    for route, figures in int8["validation"]["heads"].items():
        assert figures["min_cosine"] >= 0.98 and figures["mean_cosine"] >= 0.995, (route, figures)
    smoothing = int8["quantization"]["smoothing"]
    assert smoothing["inputs"] > 0 and len(smoothing["tried"]) == len(ALPHAS) + 1, "its outliers were found"
