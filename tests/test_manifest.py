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
    with pytest.raises(
        ManifestError,
        match="not a jobbert-onnx export, nor a sentence-transformers folder.*`jobbert-onnx export SOURCE",
    ):
        Encoder.load(tmp_path, device="cpu")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="is not a folder, nor a hub id"):
        Encoder.load(tmp_path / "nothing", device="cpu")


def test_newer_schema_is_refused(export_copy: Path) -> None:
    path = export_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(
        ManifestError, match="uses manifest schema 99; this jobbert-onnx reads schema 4 at most: upgrade"
    ):
        Encoder.load(export_copy, device="cpu")


EXPORT_FILES = ["encoder.int8.onnx", "pooling.onnx", "head_anchor.onnx", "head_positive.onnx", "tokenizer.json"]


@pytest.mark.parametrize("name", EXPORT_FILES)
def test_missing_file_is_named(export_copy: Path, name: str) -> None:
    (export_copy / name).unlink()
    with pytest.raises(ManifestError, match=rf"{name.replace('.', '[.]')} is listed in the manifest but missing"):
        Encoder.load(export_copy, device="cpu", precision="int8")


@pytest.mark.parametrize("name", EXPORT_FILES)
def test_truncated_file_is_named(export_copy: Path, name: str) -> None:
    path = export_copy / name
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ManifestError, match=rf"{name.replace('.', '[.]')} has 100 bytes but the manifest records"):
        Encoder.load(export_copy, device="cpu", precision="int8")


def test_not_json(export_copy: Path) -> None:
    (export_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="is not valid JSON"):
        Encoder.load(export_copy, device="cpu")


@pytest.mark.parametrize("name", EXPORT_FILES)
def test_corrupted_file_is_named(export_copy: Path, name: str) -> None:
    path = export_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=rf"{name.replace('.', '[.]')} does not match its sha256 in the manifest"):
        Encoder.load(export_copy, device="cpu", precision="int8")


def test_swapped_heads_are_refused(export_copy: Path) -> None:
    anchor, positive = export_copy / "head_anchor.onnx", export_copy / "head_positive.onnx"
    a, b = anchor.read_bytes(), positive.read_bytes()
    anchor.write_bytes(b)
    positive.write_bytes(a)
    with pytest.raises(ManifestError, match=r"head_anchor[.]onnx"):
        Encoder.load(export_copy, device="cpu")


def test_verification_can_be_skipped(export_copy: Path) -> None:
    path = export_copy / "tokenizer.json"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace('"<unk>"', '"<UNK>"', 1), encoding="utf-8")
    assert path.stat().st_size == len(text.encode("utf-8"))
    with pytest.raises(ManifestError, match="does not match its sha256"):
        Encoder.load(export_copy, device="cpu")
    assert Encoder.load(export_copy, device="cpu", verify=False).encode("Koch").shape == (1024,)
