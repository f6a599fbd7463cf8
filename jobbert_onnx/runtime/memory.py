"""Give memory back after a large call.

onnxruntime's arenas are shrunk per run (see `chain`); what the tokenizer and
numpy freed stays in the C heap, where glibc keeps it for reuse: tokenizing
4,096 long texts left 250 MB resident that no later call needed. `trim_heap`
returns such free pages to the operating system (glibc's ``malloc_trim``; a
no-op on other C libraries).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def trim_heap() -> bool:
    """Return free heap pages to the OS; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
