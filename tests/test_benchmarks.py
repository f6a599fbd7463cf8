"""The benchmark suite itself: it runs end to end and reports quality next to speed."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import workloads
from benchmarks.__main__ import _made_from, _prepare
from benchmarks.ceilings import flops_per_text
from jobbert_onnx.vectors import row_cosines

ROOT = Path(__file__).resolve().parent.parent


def test_flops_per_text_matches_the_architecture() -> None:
    # 12 layers x (4 x 768^2 + 2 x 768 x 3072) multiply-adds: ~170 MFLOP per token, plus attention and the head.
    one_token = flops_per_text(np.array([1]))
    assert 169e6 < one_token < 172e6
    ten = flops_per_text(np.array([10]))
    assert 10 * 169e6 < ten < 10 * 172e6


def test_workloads_are_seeded_and_skill_lists_are_40_to_80_tokens(tiny_exports: dict) -> None:
    tokenizer_json = tiny_exports[("router", "fp32")] / "tokenizer.json"
    assert workloads.titles(50) == workloads.titles(50)
    lists = workloads.skill_lists(40, tokenizer_json)
    assert lists == workloads.skill_lists(40, tokenizer_json)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.no_truncation()
    lengths = np.array([len(tokenizer.encode(text).ids) for text in lists])
    assert lengths.min() >= 40 and np.median(lengths) >= 55, lengths
    # Targets are drawn from 40-80 tokens; a list stops at the first skill that reaches its target.
    assert (lengths >= 64).mean() >= 0.3 and lengths.max() <= 80 + 40, lengths


def test_suite_runs_and_reports_quality(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmarks", "--quick", "--tiny", "--no-peers"]
    command += ["--only", "jobbert-onnx int8,jobbert-onnx fp32"]
    command += ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads((tmp_path / "out" / "bench-cpu.json").read_text())
    names = [c["contender"] for c in document["contenders"]]
    assert names[0] == "sentence-transformers PyTorch fp32", "the fp32 reference always runs"
    assert {"jobbert-onnx int8", "jobbert-onnx fp32"} <= set(names)
    assert document["ceilings"]["fp32_gflops"] > 0 and document["ceilings"]["int8_gflops"] > 0
    for contender in document["contenders"]:
        assert "error" not in contender, contender
        assert contender["peak_rss_mib"] > 0
        for name in ("titles", "skill_lists"):
            row = contender["workloads"][name]
            assert row["latency"]["calls"] == 20 and row["latency"]["p50_ms"] > 0
            assert row["throughput"]["8"]["texts_per_s"] > 0
            if contender["contender"] == "jobbert-onnx fp32":
                assert row["cosine"]["min"] > 0.99999
            if contender["contender"] == "jobbert-onnx int8":
                assert 0.97 <= row["cosine"]["min"] < 1.0
    table = (tmp_path / "out" / "bench-cpu.md").read_text()
    assert "| jobbert-onnx int8 | int8 |" in table and "cosine min" in table
    assert not list((tmp_path / "out").glob("*.npy")), "vectors are cleaned up"


def test_int4_blocks_pack_as_matmulnbits_reads_them() -> None:
    """Two levels per byte, the first in the low nibble, zero point 8; each block's scale beats its plain max scale."""
    from benchmarks.int4 import quantize_blocks

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(64, 3)).astype(np.float32)
    packed, scales = quantize_blocks(weight, 32)
    assert packed.shape == (3, 2, 16) and packed.dtype == np.uint8 and scales.shape == (6,)
    levels = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(3, 2, 32).astype(np.float32) - 8
    blocks = weight.T.reshape(3, 2, 32)
    scale = scales.reshape(3, 2, 1)
    assert np.array_equal(levels, np.clip(np.round(blocks / scale), -8, 7)), "level k of a block is element k"
    plain = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1) / -8.0
    error = ((levels * scale - blocks) ** 2).sum(-1)
    plain_error = ((np.clip(np.round(blocks / plain), -8, 7) * plain - blocks) ** 2).sum(-1)
    assert np.all(error <= plain_error + 1e-9) and np.any(error < plain_error)


def test_int4_encoder_runs_in_onnxruntime_close_to_fp32(tiny_exports: dict, tmp_path: Path) -> None:
    """The benchmark's int4 candidate: MatMulNBits for every product, MultiHeadAttention, same outputs to ~4 bits."""
    import onnx
    import onnxruntime as ort

    from benchmarks.int4 import write_int4
    from jobbert_onnx.manifest import encoder_file

    export = tiny_exports[("router", "fp32")]
    out = tmp_path / "int4.onnx"
    write_int4(export / encoder_file("fp32"), out, block=16, accuracy_level=4)
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert {"MatMulNBits", "MultiHeadAttention"} <= ops and not ops & {"MatMul", "Attention"}
    ids = np.array([[0, 2041, 4567, 87, 2, 1, 1], [0, 35, 3293, 1340, 9, 111, 2]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}
    outputs = [
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        for path in (export / encoder_file("fp32"), out)
    ]
    real = feed["attention_mask"] == 1
    cosines = row_cosines(outputs[1][real], outputs[0][real])
    assert cosines.min() > 0.9, cosines.min()


def test_graph_ab_times_each_graph_on_each_shape(tiny_exports: dict, tmp_path: Path) -> None:
    from benchmarks import graph_ab
    from jobbert_onnx.manifest import encoder_file

    export = tiny_exports[("router", "int8")]
    graphs = [f"{p}={export / encoder_file(p)}" for p in ("fp32", "int8")]
    assert graph_ab.main([*graphs, "--shapes", "2x5,1x3", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "graph_ab.json").read_text())
    assert set(record["results"]) == {"2x5", "1x3"}
    for figures in record["results"].values():
        assert set(figures) == {"fp32", "int8"}
        assert all(0 < f["best_ms"] <= f["median_ms"] and f["runs"] >= 8 for f in figures.values())


def test_the_benchmark_refuses_an_export_made_from_other_weights(
    tiny_models: dict[str, Path], tiny_exports: dict[tuple[str, str], Path]
) -> None:
    export = tiny_exports[("router", "int8")]
    assert _made_from(export, tiny_models["router"])
    assert not _made_from(export, tiny_models["legacy-asym"]), "another seed, other weights"
    args = argparse.Namespace(model=tiny_models["legacy-asym"], export=export, work=export.parent, device="cpu")
    with pytest.raises(SystemExit, match="was exported from other weights than .*; export .* again"):
        _prepare(args)


def test_int8_choices_measures_each_choice_alone(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from benchmarks import int8_choices

    argv = [str(tiny_models["router"]), "--scale", "2", "--titles", "12", "--skill-lists", "4", "--out", str(tmp_path)]
    assert int8_choices.main(argv) == 0
    record = json.loads((tmp_path / "choices.json").read_text())
    assert record["scale"] == 2 and record["texts"] == {"titles": 12, "skill_lists": 4}
    variants = record["variants"]
    assert len(variants) == 6
    assert variants["shipped"]["applied"]["word_embeddings"].startswith("int8, one scale per row")
    for figures in variants.values():
        for kind in ("titles", "skill_lists"):
            assert 0.99 < figures[kind]["min"] <= figures[kind]["mean"] < 1.0, figures
    titles = {name: figures["titles"]["mean"] for name, figures in variants.items()}
    assert len(set(titles.values())) >= 5, "the variants are different graphs"
    assert titles["embeddings fp32"] > titles["shipped"] > titles["embeddings with one scale (onnxruntime's quantizer)"]
