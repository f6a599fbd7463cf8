"""`export_model`: source model -> validated export folder, in one call."""

from __future__ import annotations

import gc
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from jobbert_onnx import samples
from jobbert_onnx._files import write_json
from jobbert_onnx.errors import OutputExistsError, UsageError
from jobbert_onnx.export import graphs
from jobbert_onnx.export.merged import write_merged
from jobbert_onnx.export.packed import write_packed
from jobbert_onnx.export.quantize import Calibration
from jobbert_onnx.export.reference import TorchReference
from jobbert_onnx.export.source import ModelSpec, read_model
from jobbert_onnx.export.tokenizer import write_tokenizer
from jobbert_onnx.export.validate import Expected, ExportValidationError, describe_failure, validate_export
from jobbert_onnx.manifest import (
    DEFAULT_PRECISIONS,
    FORMAT_NAME,
    MANIFEST_NAME,
    POOLING_FILE,
    PRECISIONS,
    SCHEMA_VERSION,
    STARTS_PRECISIONS,
    TOKENIZER_FILE,
    encoder_file,
    head_file,
    merged_file,
    packed_file,
    sha256_file,
)
from jobbert_onnx.runtime.memory import trim_heap

TRACE_FOLDER = ".trace"


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
        "task_routes": dict(spec.task_routes),
        "catch_all_route": spec.catch_all_route,
        "normalized": spec.normalize,
        "include_prompt": spec.include_prompt,
        "module": spec.router_kind,
    }


def _prepare_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output} is a file; choose a folder for the export")
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                f"{output} exists and is not empty; choose another folder or pass overwrite=True (--overwrite)"
            )
        if not (output / MANIFEST_NAME).is_file():
            raise OutputExistsError(
                f"{output} is not a jobbert-onnx export; refusing to overwrite it, choose another folder"
            )


def parse_precisions(precision: str | Sequence[str]) -> tuple[str, ...]:
    """``"fp16,int8"`` or ``["fp16", "int8"]`` -> ``("fp16", "int8")``, checked and without repeats."""
    names = precision.split(",") if isinstance(precision, str) else list(precision)
    chosen = tuple(dict.fromkeys(name.strip().lower() for name in names if name.strip()))
    unknown = [name for name in chosen if name not in PRECISIONS]
    if unknown or not chosen:
        raise UsageError(
            f"unknown precision {', '.join(unknown) or repr(precision)}; choose one or more of: {', '.join(PRECISIONS)}"
        )
    return chosen


def export_model(
    source: str,
    output_dir: str | Path,
    revision: str | None = None,
    precision: str | Sequence[str] | None = None,
    overwrite: bool = False,
    validate_device: str = "auto",
    log: Callable[[str], None] = print,
    allow_pickle: bool = False,
    attention_mask: str | None = None,
    merged: bool = False,
    packed: bool = False,
) -> dict[str, Any]:
    """Export JobBERT-v3 to ONNX graphs, validate them against PyTorch, and write the manifest.

    The folder is assembled under a temporary name beside `output_dir` and renamed
    only after validation passed, so an interrupted or failed export never leaves
    a folder that loads.

    Args:
        source: Hub id (e.g. ``TechWolf/JobBERT-v3``) or a local sentence-transformers folder.
        output_dir: Folder to write.
        revision: Branch, tag or commit, for hub ids.
        precision: Encoder variants to write, e.g. ``"fp16,int8"`` or ``["fp32"]``: ``fp16``
            (half precision, for GPUs), ``fp32``, ``int8`` (per-token int8, for CPUs).
            None: the defaults, fp16 and int8, where a variant that misses its gate is left
            out with a warning (the manifest's ``dropped`` says why) instead of failing the
            export, and fp32 is added where int8 is left out, so the CPU never has only fp16
            (which it runs through casts); a variant asked for by name that misses its gate
            fails the export.
        overwrite: Replace an existing export in `output_dir`.
        validate_device: Where the new graphs run for validation (``auto``, ``cuda``, ``cpu``).
        log: Receives one line per step.
        allow_pickle: Read ``pytorch_model.bin`` where a module has no safetensors file.
            Loading pickle can run code hidden in the file: only for sources you trust.
        attention_mask: How the encoder's Attention nodes take the padding mask, for every
            variant (``lengths``, ``lengths-starts``, ``2d``; see `graphs.ATTENTION_MASKS`);
            None: per precision, ``lengths-starts`` for fp16 (a fused kernel on every NVIDIA
            GPU) and ``lengths`` for the CPU variants.
        merged: Also write the fp16 encoder, pooling and every head as one graph
            (`merged_file`): one run per batch, what CUDA runs by default where it exists
            (`Tuning.merged`). It is validated like the chain.
        packed: Also write the fp16 encoder without padding inside (`packed_file`:
            RemovePadding, PackedAttention, RestorePadding), which only CUDA runs
            (`Tuning.packed`); validated where the validation runs on CUDA.

    Returns:
        The manifest that was written.

    Raises:
        UnsupportedModelError: The source is not JobBERT-v3-shaped.
        ExportValidationError: The graphs do not match PyTorch closely enough.
    """
    named = precision is not None
    precisions = parse_precisions(precision if precision is not None else DEFAULT_PRECISIONS)
    if attention_mask is not None and attention_mask not in graphs.ATTENTION_MASKS:
        raise UsageError(
            f"unknown attention mask form {attention_mask!r}; choose from: {', '.join(graphs.ATTENTION_MASKS)}"
        )
    if attention_mask not in (None, "lengths") and "int8" in precisions:
        raise UsageError(
            f"the int8 variant takes the padding mask as key lengths only, not {attention_mask!r}: "
            "export int8 separately, without --attention-mask"
        )
    if attention_mask == "lengths-starts" and set(precisions) - set(STARTS_PRECISIONS):
        raise UsageError(
            "the lengths-starts mask form is read right only by fp16's attention kernel (on CUDA, fp32 would "
            f"attend to padding): export {', '.join(sorted(set(precisions) - set(STARTS_PRECISIONS)))} without it"
        )
    for flag, asked in (("--merged", merged), ("--packed", packed)):
        if asked and "fp16" not in precisions:
            raise UsageError(f"{flag} applies to the fp16 variant (for CUDA): add fp16 to --precision, or drop {flag}")
    masks = {name: attention_mask or graphs.DEFAULT_ATTENTION_MASK[name] for name in precisions}
    output = Path(output_dir).expanduser().resolve()
    _prepare_output(output, overwrite)
    started = time.perf_counter()
    spec = read_model(source, revision, allow_pickle)
    log(f"read {spec.router_kind} model from {spec.folder} ({spec.encoder_config['num_hidden_layers']} layers)")

    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    # Inside the work folder, so that an export killed mid-way leaves one folder beside its output
    # (which the cache removes), not a gigabyte of trace in the system's temporary folder.
    trace = work / TRACE_FOLDER
    trace.mkdir()
    fused = trace / "encoder.fused.onnx"
    try:
        write_tokenizer(spec, work / TOKENIZER_FILE)
        calibration = Calibration(work / TOKENIZER_FILE, samples.calibration_sample())
        log("tracing the encoder ...")
        graphs.export_encoder(spec, trace / "encoder.raw.onnx")
        _release()
        log("fusing ...")
        graphs.fuse_encoder(trace / "encoder.raw.onnx", fused, spec)
        (trace / "encoder.raw.onnx").unlink()
        _release()
        variants = {}
        for name in precisions:
            log(f"writing the {name} encoder ...")
            variants[name] = graphs.write_variant(fused, work / encoder_file(name), name, masks[name], calibration)
            _release()
            log(f"encoder {name}: {variants[name]}")
        graphs.write_pooling(work / POOLING_FILE, spec.hidden_size)
        for route, head in spec.heads.items():
            graphs.write_head(work / head_file(route), head)
        if merged:
            log("merging the fp16 encoder, pooling and heads into one graph ...")
            facts = write_merged(work, encoder_file("fp16"), tuple(spec.heads), work / merged_file("fp16"))
            variants["fp16"]["merged"] = merged_file("fp16")
            variants["fp16"]["merged_nodes"] = facts["nodes"]
            _release()
        if packed:
            log("writing the fp16 encoder without padding inside (CUDA only) ...")
            facts = write_packed(fused, work / packed_file("fp16"))
            variants["fp16"]["packed"] = packed_file("fp16")
            variants["fp16"]["packed_nodes"] = facts["nodes"]
            _release()

        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {
                "model": source,
                "revision": spec.revision,
                "local_path": str(spec.folder),
                "weights_sha256": spec.weight_hashes(),
                "configs_sha256": spec.config_hashes(),
                "saved_by": spec.saved_by,
                "module_types": list(spec.module_types),
                "max_seq_length_from": spec.length_source,
            },
            "architecture": _architecture(spec),
            "variants": {name: _variant_entry(name, variants[name]) for name in precisions},
            "opset": graphs.OPSET,
            "versions": _versions(),
            "files": _file_facts(work),
            "validation": None,
        }
        _write_manifest(work, manifest)

        log("validating against the PyTorch model ...")
        expected = Expected.compute(TorchReference(spec), samples.validation_sample(), tuple(spec.heads))
        _release()
        figures = validate_export(work, expected, validate_device)
        _log_figures(figures, log)
        failed = [name for name, variant in figures["variants"].items() if not variant["passed"]]
        if "int8" in failed and not named and "fp32" not in precisions and figures["token_ids_match"]:
            # The CPU would otherwise be left with fp16, which it runs through casts.
            log("int8 missed its gate: adding fp32, so the CPU has a variant of its own")
            variants["fp32"] = graphs.write_variant(fused, work / encoder_file("fp32"), "fp32", attention_mask)
            manifest["variants"]["fp32"] = _variant_entry("fp32", variants["fp32"])
            manifest["files"] = _file_facts(work)
            manifest["cpu_fallback"] = "fp32 added because int8 missed its gate"
            _write_manifest(work, manifest)
            added = validate_export(work, expected, validate_device, precisions=["fp32"])
            _log_figures(added, log)
            figures["variants"]["fp32"] = added["variants"]["fp32"]
            figures["passed"] = figures["passed"] and added["passed"]
        for name, variant in figures["variants"].items():
            manifest["variants"][name]["validation"] = variant
        if failed and not named and figures["token_ids_match"] and len(failed) < len(figures["variants"]):
            _drop(work, manifest, figures, failed, log)
        manifest["validation"] = {key: value for key, value in figures.items() if key != "variants"}
        _write_manifest(work, manifest)
        if not figures["passed"]:
            raise ExportValidationError(f"the exported graphs do not match PyTorch: {describe_failure(figures)}")

        shutil.rmtree(trace)
        if output.exists():
            shutil.rmtree(output)
        os.replace(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"wrote {output} in {time.perf_counter() - started:.0f}s")
    return manifest


def _release() -> None:
    """Give the memory a step freed back to the OS, so that the steps' peaks do not add up: the
    graphs' protobuf copies are freed into the C heap, where glibc would otherwise keep them."""
    gc.collect()
    trim_heap()


def _variant_entry(name: str, facts: dict[str, Any]) -> dict[str, Any]:
    return {"file": encoder_file(name), **facts, "validation": None}


def _file_facts(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        path.name: {"sha256": sha256_file(path), "size": path.stat().st_size}
        for path in sorted(folder.iterdir())
        if path.name not in (MANIFEST_NAME, TRACE_FOLDER)
    }


def _log_figures(figures: dict[str, Any], log: Callable[[str], None]) -> None:
    if figures.get("cuda_unusable"):
        log(f"CUDA is not usable, so fp16 and fp32 are validated on the CPU: {figures['cuda_unusable']}")
    for name, variant in figures["variants"].items():
        for route, head in variant["heads"].items():
            log(
                f"  {name} {route}: min cosine {head['min_cosine']:.7f}, "
                f"mean {head['mean_cosine']:.7f} ({variant['device']})"
            )
        for form in ("merged", "packed"):
            for route, head in variant.get(form, {}).get("heads", {}).items():
                log(
                    f"  {name} {route}, {form}: min cosine {head['min_cosine']:.7f}, "
                    f"mean {head['mean_cosine']:.7f} ({variant['device']})"
                )
            if variant.get(form, {}).get("note"):
                log(f"  {name} {form}: {variant[form]['note']}")
        if variant.get("note"):
            log(f"  {name}: {variant['note']}")


def _drop(
    work: Path, manifest: dict[str, Any], figures: dict[str, Any], failed: list[str], log: Callable[[str], None]
) -> None:
    """Leave out default variants that missed their gate, saying so in the log, a warning and the manifest."""
    manifest["dropped"] = {}
    for name in failed:
        reason = describe_failure(figures, only=name)
        cpu = ""
        if name == "int8" and "fp32" in manifest["variants"]:
            cpu = " The CPU runs the fp32 variant instead."
        message = (
            f"the {name} variant is left out of this export: it misses its gate ({reason}). "
            f"Ask for it by name (--precision {name}) to make that an error instead.{cpu}"
        )
        log(f"WARNING: {message}")
        warnings.warn(message, UserWarning, stacklevel=3)
        variant = manifest["variants"].pop(name)
        for file in (variant.pop("file"), variant.pop("merged", None), variant.pop("packed", None)):
            if file:
                (work / file).unlink()
                del manifest["files"][file]
        manifest["dropped"][name] = {"reason": reason, **variant}
        del figures["variants"][name]
    figures["passed"] = figures["token_ids_match"] and all(v["passed"] for v in figures["variants"].values())


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_json(folder / MANIFEST_NAME, manifest)
