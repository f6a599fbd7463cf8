"""The `jobbert-onnx` command: encode to JSON lines and .npy, with errors that say what to do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobbert_onnx import Encoder


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobbert_onnx.cli", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def test_encode_json_lines_match_the_library(tiny_exports: dict, encoder_fp32: Encoder) -> None:
    folder = str(tiny_exports[("router", "fp32")])
    result = _cli(
        "encode", folder, "--task", "positive", "--device", "cpu", "--precision", "fp32", stdin="python, sql\nKoch\n"
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["python, sql", "Koch"]
    expected = encoder_fp32.encode(["python, sql", "Koch"], task="positive")
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), expected, atol=1e-6)


def test_encode_to_npy(tiny_exports: dict, encoder_fp32: Encoder, tmp_path: Path) -> None:
    out = tmp_path / "v.npy"
    result = _cli(
        "encode",
        str(tiny_exports[("router", "fp32")]),
        "Chef",
        "Koch",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(out), encoder_fp32.encode(["Chef", "Koch"]), atol=1e-6)


def test_errors_are_one_clear_line(tiny_exports: dict, tmp_path: Path) -> None:
    result = _cli("encode", str(tmp_path), "x", "--device", "cpu")
    assert result.returncode == 1
    assert "jobbert-onnx encode: error:" in result.stderr and "not a jobbert-onnx export" in result.stderr
    result = _cli("encode", str(tiny_exports[("router", "fp32")]), "x", "--task", "title", "--device", "cpu")
    assert result.returncode == 1 and "unknown task 'title'; this model has: anchor, positive" in result.stderr
    result = _cli("export", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert result.returncode == 1 and "neither an existing folder nor a hub id" in result.stderr


def test_cli_defaults_come_from_the_library() -> None:
    import dataclasses
    import inspect

    from jobbert_onnx.batch.embed import EmbedJob
    from jobbert_onnx.batch.match import run_match
    from jobbert_onnx.cli import build_parser
    from jobbert_onnx.export.random_model import build_random_model
    from jobbert_onnx.serve import ServeConfig

    parser = build_parser()

    def parsed(*argv: str) -> dict:
        return vars(parser.parse_args(list(argv)))

    serve = parsed("serve", "m")
    for field in dataclasses.fields(ServeConfig):
        if field.name in serve and field.default is not dataclasses.MISSING:
            assert serve[field.name] == field.default, field.name
    embed = parsed("embed", "m", "in.txt", "out.npy", "--task", "anchor")
    for field in dataclasses.fields(EmbedJob):
        if field.name in embed and field.default is not dataclasses.MISSING:
            assert embed[field.name] == field.default, field.name
    match = parsed("match", "m", "q.txt", "t.csv", "o.csv")
    for name, parameter in inspect.signature(run_match).parameters.items():
        if name in match and parameter.default is not inspect.Parameter.empty and name != "log":
            assert match[name] == parameter.default, name
    random_model = parsed("random-model", "out")
    for name in ("size", "layout", "seed"):
        assert random_model[name] == inspect.signature(build_random_model).parameters[name].default
    assert parsed("encode", "m")["batch_size"] is None, "the device's default (Tuning.batch_size)"


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from jobbert_onnx import cli

    def bug(args: object) -> int:
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(cli, "_random_model", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["random-model", "out"])


def test_ray_keeps_an_explicit_cpu_on_gpu_clusters() -> None:
    from jobbert_onnx.batch.ray_embed import actor_placement

    assert actor_placement("cpu", cluster_gpus=4) == ("cpu", 0)
    assert actor_placement("auto", cluster_gpus=4) == ("cuda", 1)
    assert actor_placement("auto", cluster_gpus=0) == ("auto", 0)
    assert actor_placement("cuda:1", cluster_gpus=2) == ("cuda", 1)
