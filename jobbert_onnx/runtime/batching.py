"""Token lengths -> batch plans: which rows go together, and the padded shape of each batch.

Rows are taken longest first, so each batch holds texts of similar length. With
`buckets`, batches never cross a bucket, so short titles are not padded to the
length of longer texts however large the batch; with `pad_to_bucket` (CUDA) a
batch's sequence length is also rounded up to its bucket, which keeps the set
of shapes small (what CUDA graphs and the GPU kernels' caches want). A
`token_budget` caps rows x length, so a batch of short titles can hold more
rows than one of 64-token skill lists. With `round_rows` (CUDA graphs) a
batch's row count is rounded up to a power of two, so one title runs a batch of
one row and not of `batch_size`, while the shapes stay few.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jobbert_onnx.errors import UsageError


@dataclass(frozen=True)
class BatchPlan:
    """One batch: the input rows it holds, and the shape it is padded to."""

    rows: np.ndarray
    width: int
    height: int


def check_buckets(buckets: Sequence[int], max_seq_length: int) -> tuple[int, ...]:
    """Sorted, distinct bucket lengths, the last of them covering `max_seq_length`."""
    chosen = tuple(sorted({int(b) for b in buckets}))
    if not chosen or chosen[0] < 1 or any(isinstance(b, bool) for b in buckets):
        raise UsageError(f"buckets must be positive sequence lengths, e.g. (16, 32, 64); got {list(buckets)}")
    kept = tuple(b for b in chosen if b < max_seq_length)
    return (*kept, max_seq_length)


def plan_batches(
    lengths: np.ndarray,
    batch_size: int,
    buckets: tuple[int, ...] | None = None,
    token_budget: int | None = None,
    round_rows: bool = False,
    pad_to_bucket: bool = True,
) -> list[BatchPlan]:
    """Group rows into batches, longest first.

    Args:
        lengths: Token count of every row.
        batch_size: Most rows in one batch.
        buckets: Allowed padded lengths (from `check_buckets`), or None to pad
            each batch to its own longest row.
        token_budget: Most padded tokens (rows x length) in one batch, or None.
        round_rows: Pad a batch with filler rows up to the next power of two (at most
            the batch's capacity), so a bucket has few shapes.
        pad_to_bucket: Pad to the bucket's length rather than the batch's longest row.
    """
    order = np.argsort(-lengths, kind="stable")
    widths = lengths[order] if buckets is None else np.asarray(buckets)[np.searchsorted(buckets, lengths[order])]
    plans: list[BatchPlan] = []
    start = 0
    while start < len(order):
        width = max(int(widths[start]), 1)
        capacity = batch_size if token_budget is None else max(1, min(batch_size, token_budget // width))
        stop = min(start + capacity, len(order))
        if buckets is not None:
            # Stay within the bucket: the next rows may belong to a shorter one.
            stop = start + int(np.searchsorted(-widths[start:stop], -width, side="right"))
        height = min(1 << (stop - start - 1).bit_length(), capacity) if round_rows else stop - start
        rows = order[start:stop]
        if buckets is not None and not pad_to_bucket:
            width = max(int(lengths[rows].max()), 1)
        plans.append(BatchPlan(rows=rows, width=width, height=height))
        start = stop
    return plans
