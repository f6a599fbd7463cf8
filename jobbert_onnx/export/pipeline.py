"""`export_model`: source model -> validated export folder, in one call."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from jobbert_onnx import samples
from jobbert_onnx.export import graphs
from jobbert_onnx.export.reference import TorchReference
from jobbert_onnx.export.source import ModelSpec, read_model
from jobbert_onnx.export.tokenizer import write_tokenizer
from jobbert_onnx.export.validate import ExportValidationError, describe_failure, validate_export
from jobbert_onnx.manifest import (
    ENCODER_FILE,
    FORMAT_NAME,
    MANIFEST_NAME,
    POOLING_FILE,
    SCHEMA_VERSION,
    TOKENIZER_FILE,
    head_file,
    sha256_file,
)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _versions() -> dict[str, str | None]:
    import onnxruntime

    return {
        "jobbert_onnx": _version("jobbert-onnx"),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "onnx": _version("onnx"),
        "onnxruntime": onnxruntime.__version__,
        "tokenizers": _version("tokenizers"),
    }


def _architecture(spec: ModelSpec) -> dict[str, Any]:
    config = spec.encoder_config
    return {
        "model_type": config["model_type"],
        "layers": int(config["num_hidden_layers"]),
        "hidden_size": spec.hidden_size,
        "attention_heads": int(config["num_attention_heads"]),
        "intermediate_size": int(config["intermediate_size"]),
        "vocab_size": int(config["vocab_size"]),
        "max_seq_length": spec.max_seq_length,
        "pooling": "mean",
        "output_dim": spec.output_dim,
        "routes": list(spec.heads),
        "default_route": spec.default_route,
        "module": spec.router_kind,
    }


def _prepare_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} is a file; choose a folder for the export")
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{output} exists and is not empty; choose another folder or pass overwrite=True (--overwrite)"
            )
        if not (output / MANIFEST_NAME).is_file():
            raise FileExistsError(
                f"{output} is not a jobbert-onnx export; refusing to overwrite it, choose another folder"
            )


def export_model(
    source: str,
    output_dir: str | Path,
    revision: str | None = None,
    precision: str = "fp16",
    overwrite: bool = False,
    validate_device: str = "auto",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export JobBERT-v3 to ONNX graphs, validate them against PyTorch, and write the manifest.

    The folder is assembled under a temporary name beside `output_dir` and renamed
    only after validation passed, so an interrupted or failed export never leaves
    a folder that loads.

    Args:
        source: Hub id (e.g. ``TechWolf/JobBERT-v3``) or a local sentence-transformers folder.
        output_dir: Folder to write.
        revision: Branch, tag or commit, for hub ids.
        precision: ``"fp16"`` (encoder in half precision, for GPUs) or ``"fp32"``.
        overwrite: Replace an existing export in `output_dir`.
        validate_device: Where the new graphs run for validation (``auto``, ``cuda``, ``cpu``).
        log: Receives one line per step.

    Returns:
        The manifest that was written.

    Raises:
        UnsupportedModelError: The source is not JobBERT-v3-shaped.
        ExportValidationError: The graphs do not match PyTorch closely enough.
    """
    if precision not in graphs.PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(graphs.PRECISIONS)}")
    output = Path(output_dir).expanduser().resolve()
    _prepare_output(output, overwrite)
    started = time.perf_counter()
    spec = read_model(source, revision)
    log(f"read {spec.router_kind} model from {spec.folder} ({spec.encoder_config['num_hidden_layers']} layers)")

    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        raw = Path(tempfile.mkdtemp(prefix="jobbert-onnx-trace-")) / "encoder.raw.onnx"
        try:
            graphs.export_encoder(spec, raw)
            fused = graphs.optimize_encoder(raw, work / ENCODER_FILE, spec, precision)
        finally:
            shutil.rmtree(raw.parent, ignore_errors=True)
        log(f"encoder: {precision}, fused {fused}")
        graphs.write_pooling(work / POOLING_FILE, spec.hidden_size)
        for route, head in spec.heads.items():
            graphs.write_head(work / head_file(route), head)
        write_tokenizer(spec, work / TOKENIZER_FILE)

        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {
                "model": source,
                "revision": spec.revision,
                "local_path": str(spec.folder),
                "weights_sha256": spec.weight_hashes(),
            },
            "architecture": _architecture(spec),
            "precision": precision,
            "opset": graphs.OPSET,
            "fused_nodes": fused,
            "versions": _versions(),
            "files": {
                path.name: {"sha256": sha256_file(path), "size": path.stat().st_size} for path in sorted(work.iterdir())
            },
            "validation": None,
        }
        _write_manifest(work, manifest)

        log("validating against the PyTorch model ...")
        figures = validate_export(work, TorchReference(spec), samples.validation_sample(), precision, validate_device)
        manifest["validation"] = figures
        _write_manifest(work, manifest)
        for route, head in figures["heads"].items():
            log(f"  {route}: min cosine {head['min_cosine']:.7f}, mean {head['mean_cosine']:.7f} ({figures['device']})")
        if not figures["passed"]:
            raise ExportValidationError(f"the exported graphs do not match PyTorch: {describe_failure(figures)}")

        if output.exists():
            shutil.rmtree(output)
        os.replace(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"wrote {output} in {time.perf_counter() - started:.0f}s")
    return manifest


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    (folder / MANIFEST_NAME).write_text(text, encoding="utf-8")
