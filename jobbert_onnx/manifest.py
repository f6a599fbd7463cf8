"""The manifest of an export folder: what the exporter writes and the runtime reads.

This module is shared by both sides of the wall, so it needs nothing beyond the
standard library.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobbert_onnx.errors import JobbertOnnxError

MANIFEST_NAME = "manifest.json"
# 3: pooling selects real tokens with Where (NaN-safe); variants record their attention mask form.
# 4: the architecture records how tasks reach the heads (task_routes, catch_all_route, a default_route
#    that may be null) and whether prompts are pooled; a schema 3 export reads as one with none of these.
SCHEMA_VERSION = 4
OLDEST_SCHEMA_VERSION = 3
FORMAT_NAME = "jobbert-onnx"

# Encoder variants an export can hold. Pooling and heads are shared and stay fp32.
PRECISIONS = ("fp16", "fp32", "int8")
# What an export writes unless told otherwise: fp16 for GPUs and int8 for CPUs, the fastest on each.
DEFAULT_PRECISIONS = ("fp16", "int8")
# Which variant runs when the caller does not choose. On CUDA: fp16 (tensor cores),
# and never int8 (its dynamic-quantization kernels exist only on the CPU). On the
# CPU: fastest first, as measured by the benchmark (int8 ~3.5x fp32 on titles;
# fp16 has no CPU kernels worth having and runs no faster than fp32).
PREFERENCE = {"cuda": ("fp16", "fp32"), "cpu": ("int8", "fp32", "fp16")}
# The forms of the fused Attention nodes' mask input, as onnxruntime's attention kernels classify it
# (the exporter's `graphs.set_attention_mask` writes them; a variant records its form):
# - "lengths": [batch] key lengths (the transformer optimizer's default for BERT). On CUDA only
#   TensorRT's fused runner takes it, and that runner has no kernels for sm_90 (H100/H200).
# - "lengths-starts": [3 * batch + 2] key lengths, query starts and key starts. CUDA's
#   memory-efficient (cutlass) attention takes it on every GPU from sm_50 on, sm_90 included;
#   the CPU kernel reads the first `batch` entries as the same key lengths.
# - "2d": the [batch, sequence] 0/1 mask itself; only the unfused kernels take it.
ATTENTION_MASKS = ("lengths", "lengths-starts", "2d")
# "lengths-starts" is read right only by the memory-efficient kernel, which onnxruntime picks for fp16
# (head size a multiple of 8); fp32 on CUDA falls to the unfused kernel, which takes the starts for
# left-padding offsets, so every row after the first would attend to padding.
STARTS_PRECISIONS = ("fp16",)
POOLING_FILE = "pooling.onnx"
TOKENIZER_FILE = "tokenizer.json"

# Names of the graphs' inputs and outputs: the contract between export and runtime.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_EMBEDDINGS = "token_embeddings"
SENTENCE_EMBEDDING = "sentence_embedding"
EMBEDDING = "embedding"


def encoder_file(precision: str) -> str:
    """File name of the encoder graph in one precision."""
    return f"encoder.{precision}.onnx"


def head_file(route: str) -> str:
    """File name of the ONNX graph for one head (route) of the asymmetric module."""
    return f"head_{route}.onnx"


def merged_file(precision: str) -> str:
    """File name of the graph that runs encoder, pooling and every head at once (`export --merged`)."""
    return f"model.{precision}.onnx"


def packed_file(precision: str) -> str:
    """File name of the encoder that computes on real tokens only (`export --packed`, CUDA only)."""
    return f"encoder.{precision}.packed.onnx"


def merged_output(route: str) -> str:
    """The merged graph's output for one head: that head's [batch, dim] vectors."""
    return f"{EMBEDDING}_{route}"


def route_for(
    task: str | None,
    routes: tuple[str, ...],
    default: str | None,
    task_routes: dict[str, str],
    catch_all: str | None,
) -> str | None:
    """The head sentence-transformers' Router (5.x, 6.x) sends a text to, or None where it raises.

    A task goes to its mapping (``route_mappings``, as it applies to text), else to the catch-all
    mapping, else to the head of its own name; no task goes to the catch-all, else the default.
    """
    if task is None:
        return catch_all or default
    return task_routes.get(task) or catch_all or (task if task in routes else None)


class ManifestError(JobbertOnnxError, ValueError):
    """An export folder is missing, incomplete, or from an incompatible version."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large weights do not sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def source_configs(folder: Path) -> list[Path]:
    """The configuration files of a sentence-transformers folder (every ``*.json`` but in hidden
    folders): with the weights, what decides an export of it, so a cached export is checked against both."""
    return sorted(
        path
        for path in folder.rglob("*.json")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


@dataclass(frozen=True)
class Variant:
    """One encoder graph of an export: its precision, file, attention mask form, and validation figures."""

    precision: str
    file: str
    attention_mask: str
    validation: dict[str, Any]
    merged_file: str | None = None  # encoder, pooling and every head in one graph (`export --merged`)
    packed_file: str | None = None  # the encoder without padding inside (`export --packed`, CUDA only)


@dataclass(frozen=True)
class Manifest:
    """The facts the runtime needs from `manifest.json`, with the raw document kept."""

    folder: Path
    variants: dict[str, Variant]
    routes: tuple[str, ...]
    default_route: str | None  # None: every call names its task
    max_seq_length: int
    hidden_size: int
    output_dim: int
    files: dict[str, dict[str, Any]]
    raw: dict[str, Any]
    # Task names that reach a head other than their own (the Router's route_mappings for text), and
    # the head every task reaches when the model maps them all to one.
    task_routes: dict[str, str]
    catch_all_route: str | None
    include_prompt: bool  # False: the model pools without the prompt's tokens

    def path(self, name: str) -> Path:
        """Absolute path of one file listed in the manifest."""
        return self.folder / name

    def verify(self, names: list[str]) -> None:
        """Check the sha256 of the listed files against the manifest.

        Raises:
            ManifestError: A file's content differs from what the export wrote (corrupted or swapped).
        """
        for name in names:
            expected = self.files[name].get("sha256")
            found = sha256_file(self.path(name))
            if found != expected:
                raise ManifestError(
                    f"{self.path(name)} does not match its sha256 in the manifest (expected {expected}, "
                    f"found {found}): the file is corrupted or was replaced; copy the export folder again "
                    "(or pass verify=False to skip this check at your own risk)"
                )

    def choose_variant(self, device_kind: str, precision: str | None = None) -> Variant:
        """The variant to run on ``cpu`` or ``cuda``: `precision` if given, else the preferred one.

        Raises:
            ManifestError: The requested precision is not in this export, or does not fit the device.
        """
        have = ", ".join(self.variants)
        if precision is None:
            for name in PREFERENCE[device_kind]:
                if name in self.variants:
                    self._warn_fp16_on_cpu(device_kind, name)
                    return self.variants[name]
            raise ManifestError(
                f"{self.folder} holds only {have}, which does not run on {device_kind}; "
                f"export with --precision {PREFERENCE[device_kind][0]}"
            )
        dropped = self.raw.get("dropped", {}).get(precision)
        if dropped is not None:
            raise ManifestError(
                f"{self.folder} has no {precision!r} variant: the export left it out because it missed its gate "
                f"({dropped['reason']}); it has: {have}"
            )
        if precision not in self.variants:
            raise ManifestError(
                f"{self.folder} has no {precision!r} variant (it has: {have}); pick one of those, "
                f"or export again with --precision {precision}"
            )
        if precision not in PREFERENCE[device_kind]:
            raise ManifestError(
                f"the {precision} variant runs on the CPU only (its kernels are CPU kernels); "
                f"on {device_kind} use one of: {', '.join(p for p in PREFERENCE[device_kind] if p in self.variants)}"
            )
        self._warn_fp16_on_cpu(device_kind, precision)
        return self.variants[precision]

    def _warn_fp16_on_cpu(self, device_kind: str, precision: str) -> None:
        if device_kind != "cpu" or precision != "fp16":
            return
        better = [name for name in PREFERENCE["cpu"] if name in self.variants and name != "fp16"]
        fix = (
            f"load precision={better[0]!r} from this export"
            if better
            else "export the model again with the default precisions or --precision fp16,fp32"
        )
        warnings.warn(
            f"running the fp16 variant on the CPU, which computes it through casts to fp32 "
            f"(slower than fp32, and less exact): {fix}",
            RuntimeWarning,
            stacklevel=4,
        )


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
    if version < OLDEST_SCHEMA_VERSION:
        raise ManifestError(
            f"{manifest_path} uses manifest schema {version}, from an older jobbert-onnx; "
            f"this one reads schema {OLDEST_SCHEMA_VERSION} to {SCHEMA_VERSION}: export the model again"
        )
    try:
        arch = raw["architecture"]
        files = raw["files"]
        variants = {
            str(name): Variant(
                str(name),
                str(facts["file"]),
                str(facts["attention_mask"]),
                dict(facts.get("validation") or {}),
                str(facts["merged"]) if facts.get("merged") else None,
                str(facts["packed"]) if facts.get("packed") else None,
            )
            for name, facts in raw["variants"].items()
        }
        wrong = [v.precision for v in variants.values() if v.attention_mask == "lengths-starts"]
        wrong = [precision for precision in wrong if precision not in STARTS_PRECISIONS]
        if wrong:
            raise ManifestError(
                f"{manifest_path}: the {', '.join(wrong)} encoder takes its mask as lengths and starts, which only "
                "fp16's attention kernel reads right: export it again without --attention-mask lengths-starts"
            )
        manifest = Manifest(
            folder=folder,
            variants=variants,
            routes=tuple(arch["routes"]),
            default_route=None if arch["default_route"] is None else str(arch["default_route"]),
            max_seq_length=int(arch["max_seq_length"]),
            hidden_size=int(arch["hidden_size"]),
            output_dim=int(arch["output_dim"]),
            files=dict(files),
            raw=raw,
            task_routes={str(task): str(route) for task, route in (arch.get("task_routes") or {}).items()},
            catch_all_route=None if arch.get("catch_all_route") is None else str(arch["catch_all_route"]),
            include_prompt=bool(arch.get("include_prompt", True)),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ManifestError(f"{manifest_path} lacks a required entry ({error!r}); export the model again") from error

    unknown = [name for name in manifest.variants if name not in PRECISIONS]
    if unknown or not manifest.variants:
        raise ManifestError(
            f"{manifest_path} lists variants {list(manifest.variants)}; this jobbert-onnx knows {', '.join(PRECISIONS)}"
        )
    required = [
        *(v.file for v in manifest.variants.values()),
        *(v.merged_file for v in manifest.variants.values() if v.merged_file),
        *(v.packed_file for v in manifest.variants.values() if v.packed_file),
        POOLING_FILE,
        TOKENIZER_FILE,
        *(head_file(r) for r in manifest.routes),
    ]
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
    for what, route in (
        ("default route", manifest.default_route),
        ("catch-all route", manifest.catch_all_route),
        *((f"task {task!r}'s route", target) for task, target in manifest.task_routes.items()),
    ):
        if route is not None and route not in manifest.routes:
            raise ManifestError(f"{manifest_path}: {what} {route!r} is not one of {manifest.routes}")
    return manifest
