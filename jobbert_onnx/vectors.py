"""Vector arithmetic shared by the runtime, the batch jobs, the exporter's checks and the benchmarks."""

from __future__ import annotations

import numpy as np


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows of `vectors` scaled to unit length, as a new float32 array (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of `a` with every row of `b`: [len(a), len(b)]."""
    return normalize(np.atleast_2d(a)) @ normalize(np.atleast_2d(b)).T


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine between matching rows of two [n, d] arrays, in float64.

    Two zero rows count as equal (1.0); a zero row against a non-zero one as unrelated (0.0).
    """
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norm_a, norm_b = np.linalg.norm(a64, axis=1), np.linalg.norm(b64, axis=1)
    norms = norm_a * norm_b
    cosines = (a64 * b64).sum(1) / np.where(norms == 0, 1.0, norms)
    return np.where((norm_a == 0) & (norm_b == 0), 1.0, cosines)
