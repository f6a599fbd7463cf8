"""A minimal progress bar on stderr, so the runtime needs no tqdm."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Counts texts done and redraws one line at most every 0.2 s."""

    def __init__(self, total: int, enabled: bool, label: str = "Encoding", stream: TextIO | None = None) -> None:
        self.total = total
        self.enabled = enabled and total > 0
        self.label = label
        self.stream = stream or sys.stderr
        self.done = 0
        self._start = time.perf_counter()
        self._drawn = 0.0

    def update(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if self.enabled and (now - self._drawn > 0.2 or self.done >= self.total):
            self._drawn = now
            self._draw(now)

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        width = 30
        filled = int(width * self.done / self.total)
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(
            f"\r{self.label} [{bar}] {self.done}/{self.total} {rate:,.0f} texts/s, "
            f"{elapsed:.1f}s elapsed, ~{left:.1f}s left"
        )
        self.stream.flush()
