"""The manifest of an export folder: what the exporter writes and the runtime reads.

This module is shared by both sides of the wall, so it needs nothing beyond the
standard library.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
FORMAT_NAME = "jobbert-onnx"

ENCODER_FILE = "encoder.onnx"
POOLING_FILE = "pooling.onnx"
TOKENIZER_FILE = "tokenizer.json"

# Names of the graphs' inputs and outputs: the contract between export and runtime.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_EMBEDDINGS = "token_embeddings"
SENTENCE_EMBEDDING = "sentence_embedding"
EMBEDDING = "embedding"


def head_file(route: str) -> str:
    """File name of the ONNX graph for one head (route) of the asymmetric module."""
    return f"head_{route}.onnx"


class ManifestError(ValueError):
    """An export folder is missing, incomplete, or from an incompatible version."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large weights do not sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """The facts the runtime needs from `manifest.json`, with the raw document kept."""

    folder: Path
    precision: str
    routes: tuple[str, ...]
    default_route: str
    max_seq_length: int
    hidden_size: int
    output_dim: int
    files: dict[str, dict[str, Any]]
    raw: dict[str, Any]

    def path(self, name: str) -> Path:
        """Absolute path of one file listed in the manifest."""
        return self.folder / name


def read_manifest(folder: str | Path) -> Manifest:
    """Read and check the manifest of an export folder.

    Checks the format name, the schema version, and that every listed file is
    present with the recorded size (a cheap guard against truncated copies).

    Args:
        folder: A folder written by `jobbert-onnx export`.

    Raises:
        ManifestError: The folder is not an export, or is incomplete, or needs a
            newer jobbert-onnx.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder; pass the output folder of `jobbert-onnx export`")
    if not manifest_path.is_file():
        raise ManifestError(
            f"{folder} has no {MANIFEST_NAME}, so it is not a jobbert-onnx export; "
            f"create one with `jobbert-onnx export SOURCE {folder}`"
        )
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ManifestError(f"{manifest_path} is not valid JSON ({error}); export the model again") from error
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise ManifestError(f'{manifest_path} is not a jobbert-onnx manifest (no "format": "{FORMAT_NAME}")')
    version = raw.get("schema_version")
    if not isinstance(version, int):
        raise ManifestError(f"{manifest_path} has no integer schema_version; export the model again")
    if version > SCHEMA_VERSION:
        raise ManifestError(
            f"{manifest_path} uses manifest schema {version}; this jobbert-onnx reads schema "
            f"{SCHEMA_VERSION} at most: upgrade jobbert-onnx (pip install -U jobbert-onnx)"
        )
    try:
        arch = raw["architecture"]
        files = raw["files"]
        manifest = Manifest(
            folder=folder,
            precision=str(raw["precision"]),
            routes=tuple(arch["routes"]),
            default_route=str(arch["default_route"]),
            max_seq_length=int(arch["max_seq_length"]),
            hidden_size=int(arch["hidden_size"]),
            output_dim=int(arch["output_dim"]),
            files=dict(files),
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ManifestError(f"{manifest_path} lacks a required entry ({error!r}); export the model again") from error

    required = [ENCODER_FILE, POOLING_FILE, TOKENIZER_FILE, *(head_file(r) for r in manifest.routes)]
    for name in required:
        if name not in manifest.files:
            raise ManifestError(f"{manifest_path} does not list {name}; export the model again")
    for name, facts in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise ManifestError(f"{path} is listed in the manifest but missing; copy the whole export folder")
        size = path.stat().st_size
        if size != facts.get("size"):
            raise ManifestError(
                f"{path} has {size} bytes but the manifest records {facts.get('size')}: "
                "the file is truncated or was replaced; copy the export folder again"
            )
    if manifest.default_route not in manifest.routes:
        raise ManifestError(
            f"{manifest_path}: default route {manifest.default_route!r} is not one of {manifest.routes}"
        )
    return manifest
