"""Check a freshly written export against the PyTorch reference before it is reported done."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from jobbert_onnx.export.reference import TorchReference
from jobbert_onnx.runtime import Encoder

# Minimum cosine to the fp32 PyTorch vectors, for every text and both heads.
MIN_COSINE = {"fp16": 0.999, "fp32": 0.99999}


class ExportValidationError(RuntimeError):
    """The exported graphs do not reproduce the PyTorch model closely enough."""


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine between matching rows of two [n, d] arrays (1.0 for two zero rows)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    dot = (a64 * b64).sum(1)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    both_zero = norms == 0
    return np.where(both_zero, 1.0, dot / np.where(both_zero, 1.0, norms))


def validate_export(
    folder: Path, reference: TorchReference, texts: list[str], precision: str, device: str = "auto"
) -> dict[str, Any]:
    """Encode `texts` with both the reference and the exported graphs and compare.

    Returns:
        Figures for the manifest: per head the min and mean cosine, the largest
        absolute difference, the text with the lowest cosine; whether the token
        ids agree with transformers' tokenizer; the device used; passed or not.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "auto" falling back to the CPU is expected here
        encoder = Encoder.load(folder, device=device)
    ours = encoder.tokenizer.tokenize(texts).ids
    theirs = reference.token_ids(texts)
    mismatched = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    threshold = MIN_COSINE[precision]
    figures: dict[str, Any] = {
        "texts": len(texts),
        "device": str(encoder.device),
        "min_cosine_required": threshold,
        "token_ids_match": not mismatched,
        "heads": {},
    }
    passed = not mismatched
    for route in encoder.tasks:
        expected = reference.encode(texts, route)
        got = encoder.encode(texts, task=route, batch_size=16)
        cosines = row_cosines(got, expected)
        worst = int(np.argmin(cosines))
        figures["heads"][route] = {
            "min_cosine": float(cosines.min()),
            "mean_cosine": float(cosines.mean()),
            "max_abs_diff": float(np.abs(got - expected).max()),
            "worst_text": texts[worst][:80],
        }
        passed = passed and bool(cosines.min() >= threshold)
    figures["passed"] = passed
    if mismatched:
        figures["token_id_mismatches"] = [texts[i][:80] for i in mismatched[:5]]
    return figures


def describe_failure(figures: dict[str, Any]) -> str:
    """One readable sentence on why validation failed."""
    parts = []
    if not figures["token_ids_match"]:
        parts.append(f"token ids differ from transformers' tokenizer for {figures['token_id_mismatches']}")
    for route, head in figures["heads"].items():
        if head["min_cosine"] < figures["min_cosine_required"]:
            parts.append(
                f"head {route!r}: min cosine {head['min_cosine']:.6f} < {figures['min_cosine_required']} "
                f"(worst text: {head['worst_text']!r})"
            )
    return "; ".join(parts)
