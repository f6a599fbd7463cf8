"""Check a freshly written export against the PyTorch reference before it is reported done."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from jobbert_onnx.errors import JobbertOnnxError
from jobbert_onnx.export.reference import TorchReference
from jobbert_onnx.manifest import POOLING_FILE, read_manifest
from jobbert_onnx.runtime import Encoder
from jobbert_onnx.runtime.chain import GraphChain
from jobbert_onnx.runtime.sessions import CUDA_OPTIONS, resolve_device
from jobbert_onnx.runtime.tuning import Tuning
from jobbert_onnx.vectors import row_cosines

# Cosine to the fp32 PyTorch vectors that every variant must reach, for both heads:
# (lowest over the sample, mean over the sample).
REQUIRED_COSINE = {"fp32": (0.99999, 0.99999), "fp16": (0.999, 0.999), "int8": (0.98, 0.995)}


def allowed_norm_error(min_cosine: float) -> float:
    """How far a vector's length may stray from the reference's (relative), for a variant whose
    gate lets its direction stray to `min_cosine`: the same distance, sqrt(2 (1 - cos)), along the
    vector. Cosines cannot see a head whose scale is wrong (a Normalize left out, or added)."""
    return float(np.sqrt(2.0 * (1.0 - min_cosine)))


# onnxruntime's CPU provider has no fp16 kernels for most of the encoder: it casts to fp32 and back.
FP16_ON_CPU = (
    "fp16 ran on the CPU, where onnxruntime computes fp16 nodes in fp32 between casts: "
    "these figures check the fp16 weights and graph, not fp16 arithmetic, which only a GPU run shows"
)
PACKED_ON_CPU = (
    "not validated: the packed encoder's RemovePadding and PackedAttention have CUDA kernels only; "
    "validate on CUDA (--validate-device cuda) or run the GPU tests"
)


class ExportValidationError(JobbertOnnxError, RuntimeError):
    """The exported graphs do not reproduce the PyTorch model closely enough."""


@dataclass(frozen=True)
class Expected:
    """What the PyTorch reference computes for the validation texts, kept so the model can go."""

    texts: list[str]
    token_ids: list[list[int]]
    vectors: dict[str, np.ndarray]

    @classmethod
    def compute(cls, reference: TorchReference, texts: list[str], routes: tuple[str, ...]) -> Expected:
        return cls(texts, reference.token_ids(texts), reference.encode_heads(texts, routes))


def validate_export(
    folder: Path, expected: Expected, device: str = "auto", precisions: Sequence[str] | None = None
) -> dict[str, Any]:
    """Encode the expected texts with every variant of the export (or `precisions`), and compare.

    fp32 and fp16 run on `device`; int8 always runs on the CPU, where it is meant to.
    Where ``device="auto"`` cannot get CUDA, the reason is kept in ``cuda_unusable``
    (and with ``JOBBERT_ONNX_REQUIRE_CUDA=1`` it is an error, not a fallback).

    Returns:
        ``{"texts", "token_ids_match", "variants": {precision: figures}, "passed"}``,
        and ``cuda_unusable`` where "auto" fell back to the CPU; a variant's figures
        hold the device, the required cosines and, per head, the min and mean cosine,
        the largest absolute difference and the text with the lowest cosine.

    Raises:
        DeviceError: CUDA was required (``device="cuda"``, or ``JOBBERT_ONNX_REQUIRE_CUDA=1``)
            and cannot be used.
    """
    manifest = read_manifest(folder)
    resolved, fallback = resolve_device(device, folder / POOLING_FILE)
    texts = expected.texts
    figures: dict[str, Any] = {"texts": len(texts), "variants": {}}
    if fallback is not None:
        figures["cuda_unusable"] = fallback
    passed = True
    for precision in manifest.variants if precisions is None else precisions:
        # The variant itself, whatever a user's load would prefer on this device (fp16 on the CPU too).
        on = resolve_device("cpu" if precision == "int8" else str(resolved), folder / POOLING_FILE)[0]
        variant = manifest.variants[precision]
        tuning = Tuning(merged=False).resolve(on.kind, manifest.max_seq_length)
        encoder = Encoder(manifest, GraphChain(manifest, variant, on, tuning))
        if "token_ids_match" not in figures:
            ours = encoder.tokenizer.tokenize(texts).ids
            mismatched = [i for i, (a, b) in enumerate(zip(ours, expected.token_ids, strict=True)) if a != b]
            figures["token_ids_match"] = not mismatched
            if mismatched:
                figures["token_id_mismatches"] = [texts[i][:80] for i in mismatched[:5]]
            passed = not mismatched
        least, mean = REQUIRED_COSINE[precision]
        figures_of: dict[str, Any] = {
            "device": str(encoder.device),
            "min_cosine_required": least,
            "mean_cosine_required": mean,
            "heads": {},
        }
        if precision == "fp16" and encoder.device.kind == "cpu":
            figures_of["note"] = FP16_ON_CPU
        if encoder.device.kind == "cuda":
            figures_of["cuda_options"] = dict(CUDA_OPTIONS)
        ok = _compare(encoder, expected, figures_of["heads"], least, mean)
        if variant.merged_file:  # the one-graph form of the same variant, held to the same gate
            merged = Encoder(manifest, GraphChain(manifest, variant, on, replace(tuning, merged=True)))
            figures_of["merged"] = {"file": variant.merged_file, "heads": {}}
            ok = _compare(merged, expected, figures_of["merged"]["heads"], least, mean) and ok
        if variant.packed_file:  # CUDA kernels only: compared where the validation runs on CUDA
            figures_of["packed"] = {"file": variant.packed_file, "heads": {}}
            if encoder.device.kind == "cuda":
                packed = Encoder(manifest, GraphChain(manifest, variant, on, replace(tuning, packed=True)))
                ok = _compare(packed, expected, figures_of["packed"]["heads"], least, mean) and ok
            else:
                figures_of["packed"]["note"] = PACKED_ON_CPU
        figures_of["passed"] = ok
        figures["variants"][precision] = figures_of
        passed = passed and ok
    figures["passed"] = passed
    return figures


def _compare(encoder: Encoder, expected: Expected, heads: dict[str, Any], least: float, mean: float) -> bool:
    """Fill `heads` with each head's cosines to the reference; whether all pass the gate."""
    ok = True
    for route in encoder.tasks:
        got = encoder.encode(expected.texts, task=route, batch_size=16)
        reference = expected.vectors[route]
        cosines = row_cosines(got, reference)
        worst = int(np.argmin(cosines))
        lengths = np.linalg.norm(reference.astype(np.float64), axis=1)
        norm_error = np.abs(np.linalg.norm(got.astype(np.float64), axis=1) - lengths) / np.maximum(lengths, 1e-12)
        heads[route] = {
            "min_cosine": float(cosines.min()),
            "mean_cosine": float(cosines.mean()),
            "max_abs_diff": float(np.abs(got - reference).max()),
            "max_norm_error": float(norm_error.max()),
            "worst_text": expected.texts[worst][:80],
        }
        within = norm_error.max() <= allowed_norm_error(least)
        ok = ok and bool(cosines.min() >= least and cosines.mean() >= mean and within)
    return ok


def describe_failure(figures: dict[str, Any], only: str | None = None) -> str:
    """One readable sentence on why validation failed (for one variant: `only`)."""
    parts = []
    if not figures["token_ids_match"] and only is None:
        parts.append(f"token ids differ from transformers' tokenizer for {figures['token_id_mismatches']}")
    for precision, variant in figures["variants"].items():
        if only is not None and precision != only:
            continue
        forms = [(precision, variant["heads"])]
        for form in ("merged", "packed"):
            if form in variant:
                forms.append((f"{precision} {form}", variant[form]["heads"]))
        for name, heads in forms:
            for route, head in heads.items():
                if head["min_cosine"] < variant["min_cosine_required"]:
                    parts.append(
                        f"{name} head {route!r}: min cosine {head['min_cosine']:.6f} < "
                        f"{variant['min_cosine_required']} (worst text: {head['worst_text']!r})"
                    )
                if head["mean_cosine"] < variant["mean_cosine_required"]:
                    parts.append(
                        f"{name} head {route!r}: mean cosine {head['mean_cosine']:.6f} < "
                        f"{variant['mean_cosine_required']}"
                    )
                allowed = allowed_norm_error(variant["min_cosine_required"])
                if head.get("max_norm_error", 0.0) > allowed:
                    parts.append(
                        f"{name} head {route!r}: vector lengths off by up to {head['max_norm_error']:.2%} "
                        f"(allowed {allowed:.2%})"
                    )
    return "; ".join(parts)
