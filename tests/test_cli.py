"""The `jobbert-onnx` command: encode to JSON lines and .npy, with errors that say what to do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

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
