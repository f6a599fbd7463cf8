"""Host buffers for the vectors a run hands back, page-locked on CUDA (`Tuning.host_output`).

Copied off the device into page-locked memory, a batch's vectors are one DMA; into
ordinary (pageable) memory the driver copies them through a staging buffer of its own,
with a host core. onnxruntime's Python API has no pinned allocation for a bound output, so
the buffer is a page-aligned numpy array registered with the CUDA runtime that
onnxruntime's CUDA provider already loaded (``cudaHostRegister``). Where no such runtime
is loaded or it refuses, the buffer stays pageable: the same vectors, the slower copy, and
`PinnedHost.failure` says why.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import weakref
from typing import Any

import numpy as np

_LOG = logging.getLogger("jobbert_onnx")

PAGE = 4096
# The CUDA runtime's names, newest first; only one already in the process is used.
CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context


def host_array(shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """A C-contiguous array whose data starts on a page boundary (what page-locking works in)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + PAGE, dtype=np.uint8)
    start = -raw.ctypes.data % PAGE
    return raw[start : start + size].view(dtype).reshape(shape)


def _loaded_cudart() -> Any:
    """The CUDA runtime library this process already loaded, or None (never loads one)."""
    for name in CUDART_NAMES:
        try:
            return ctypes.CDLL(name, mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    return None


def _error(runtime: Any, code: int) -> str:
    """The CUDA runtime's name and description of an error code."""
    try:
        name, describe = runtime.cudaGetErrorName, runtime.cudaGetErrorString
        name.restype = describe.restype = ctypes.c_char_p
        return f"{name(code).decode()} ({code}): {describe(code).decode()}"
    except (AttributeError, UnicodeDecodeError):
        return f"error {code}"


class PinnedHost:
    """Makes host arrays for one chain's outputs, page-locked where the CUDA runtime allows."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.failure: str | None = None if pin else "not on CUDA"
        self.pinned_bytes = 0
        # Reentrant: an unpin runs wherever the last view of an array goes, even inside `array`.
        self._lock = threading.RLock()
        self._runtime: Any = None

    def array(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 host array of `shape`: page-locked while it lives, unless pinning failed."""
        array = host_array(shape)
        if not self.pin or self.failure is not None:
            return array
        with self._lock:
            runtime = self._runtime or _loaded_cudart()
            if runtime is None:
                return self._failed("no CUDA runtime is loaded in this process", array)
            self._runtime = runtime
            address, size = ctypes.c_void_p(array.ctypes.data), ctypes.c_size_t(array.nbytes)
            code = int(runtime.cudaHostRegister(address, size, ctypes.c_uint(_PORTABLE)))
            if code != 0:
                return self._failed(f"cudaHostRegister failed: {_error(runtime, code)}", array)
            self.pinned_bytes += array.nbytes
        owner = array
        while owner.base is not None:
            owner = owner.base
        unpin = weakref.finalize(owner, self._unpin, runtime, array.ctypes.data, array.nbytes)
        unpin.atexit = False  # at exit the CUDA runtime may be gone; the process's pages go with it
        return array

    def _unpin(self, runtime: Any, address: int, size: int) -> None:
        runtime.cudaHostUnregister(ctypes.c_void_p(address))
        with self._lock:
            self.pinned_bytes -= size

    def _failed(self, why: str, array: np.ndarray) -> np.ndarray:
        self.failure = why
        _LOG.warning(
            "the vectors' host buffers could not be page-locked (%s); they stay pageable: "
            "the same vectors, a slower copy off the device",
            why,
        )
        return array
