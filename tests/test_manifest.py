"""Loading checks the manifest and refuses folders that are not complete exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobbert_onnx import Encoder, ManifestError


@pytest.fixture
def export_copy(tiny_exports: dict, tmp_path: Path) -> Path:
    target = tmp_path / "export"
    shutil.copytree(tiny_exports[("router", "fp32")], target)
    return target


def test_folder_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a jobbert-onnx export; create one with `jobbert-onnx export"):
        Encoder.load(tmp_path, device="cpu")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="is not a folder"):
        Encoder.load(tmp_path / "nothing", device="cpu")


def test_newer_schema_is_refused(export_copy: Path) -> None:
    path = export_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(
        ManifestError, match="uses manifest schema 99; this jobbert-onnx reads schema 2 at most: upgrade"
    ):
        Encoder.load(export_copy, device="cpu")


def test_missing_file_is_named(export_copy: Path) -> None:
    (export_copy / "head_positive.onnx").unlink()
    with pytest.raises(ManifestError, match="head_positive.onnx is listed in the manifest but missing"):
        Encoder.load(export_copy, device="cpu")


def test_truncated_file_is_named(export_copy: Path) -> None:
    path = export_copy / "encoder.int8.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ManifestError, match=r"encoder\.int8\.onnx has 1000 bytes but the manifest records"):
        Encoder.load(export_copy, device="cpu")


def test_not_json(export_copy: Path) -> None:
    (export_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="is not valid JSON"):
        Encoder.load(export_copy, device="cpu")
