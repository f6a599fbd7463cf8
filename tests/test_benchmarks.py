"""The benchmark suite itself: it runs end to end and reports quality next to speed."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import workloads
from benchmarks.__main__ import _made_from, _prepare
from benchmarks.ceilings import flops_per_text

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


@pytest.mark.slow
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


def test_graph_ab_times_each_graph_on_each_shape(tiny_exports: dict, tmp_path: Path) -> None:
    from jobbert_onnx.manifest import encoder_file
    from studies import graph_ab

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


def test_the_cpu_peers_include_sentence_transformers_openvino_and_its_int8_file_names() -> None:
    from benchmarks import peers
    from benchmarks.__main__ import contenders
    from benchmarks.prepare_openvino import CALIBRATION_SAMPLES, INT8_NAME, calibration_texts

    assert peers.int8_file_name("avx2") == "model_quint8_avx2.onnx", "the avx2 preset quantizes weights to u8"
    assert peers.int8_file_name("avx512_vnni") == "model_qint8_avx512_vnni.onnx"
    openvino = {c["name"]: c for c in contenders("cpu", "avx2") if c["env"] == "openvino"}
    assert set(openvino) == {"sentence-transformers OpenVINO", "sentence-transformers OpenVINO int8 (static)"}
    assert openvino["sentence-transformers OpenVINO int8 (static)"]["options"]["file_name"] == (
        f"openvino/{INT8_NAME}.xml"
    )
    texts = calibration_texts()
    assert len(texts) == CALIBRATION_SAMPLES and len(set(texts)) == len(texts)
    assert sum("," in text for text in texts) >= CALIBRATION_SAMPLES // 3, "skill lists as well as titles"


def test_workers_keep_the_inherited_path_and_import_the_benchmarks_onnxruntime(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On a GPU machine onnxruntime-gpu is found through PYTHONPATH, ahead of a CPU build in
    site-packages: a worker given only the repository would import the CPU build."""
    import onnxruntime as ort

    from benchmarks.__main__ import _env
    from benchmarks.worker import SAME_ONNXRUNTIME_ENV

    monkeypatch.setenv("PYTHONPATH", "/staged/onnxruntime-gpu")
    env = _env(Path(sys.executable))
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/staged/onnxruntime-gpu"]
    assert json.loads(env[SAME_ONNXRUNTIME_ENV]) == {"version": ort.__version__, "file": ort.__file__}
    peer = _env(tmp_path / "peer-venv" / "bin" / "python")  # has its own onnxruntime
    assert peer["PYTHONPATH"] == str(ROOT) and SAME_ONNXRUNTIME_ENV not in peer

    check = [sys.executable, "-c", "from benchmarks.worker import check_onnxruntime; check_onnxruntime()"]
    assert subprocess.run(check, env=env, cwd=ROOT, capture_output=True).returncode == 0
    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("__version__ = '0.0.0'\n")
    shadowed = {**env, "PYTHONPATH": os.pathsep.join([str(shadow.parent), env["PYTHONPATH"]])}
    done = subprocess.run(check, env=shadowed, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "onnxruntime 0.0.0" in done.stderr and ort.__version__ in done.stderr
