"""Host buffers for a batch's vectors (`Tuning.host_output`): page-aligned, page-locked through
the CUDA runtime already in the process, and pageable (with the reason) where that fails.

The CUDA runtime is faked here; tests/test_gpu.py pins for real."""

from __future__ import annotations

import gc
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from jobbert_onnx import Tuning
from jobbert_onnx.runtime import pinned
from jobbert_onnx.runtime.pinned import PAGE, PinnedHost, host_array


class _FakeRuntime:
    """cudaHostRegister / cudaHostUnregister, answering `code` and recording what they were given."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.registered: list[tuple[int, int, int]] = []
        self.unregistered: list[int] = []

    def cudaHostRegister(self, address, size, flags) -> int:  # type: ignore[no-untyped-def]
        self.registered.append((address.value, size.value, flags.value))
        return self.code

    def cudaHostUnregister(self, address) -> int:  # type: ignore[no-untyped-def]
        self.unregistered.append(address.value)
        return 0


@pytest.mark.parametrize("shape", [(1, 1024), (37, 1024), (5, 3)])
def test_host_arrays_start_on_a_page_and_hold_their_shape(shape: tuple[int, int]) -> None:
    array = host_array(shape)
    assert array.ctypes.data % PAGE == 0 and array.shape == shape and array.dtype == np.float32
    assert array.flags.c_contiguous and array.flags.writeable
    array[...] = 1.5
    assert float(array.sum()) == 1.5 * array.size


def test_arrays_are_pinned_while_they_live_and_unpinned_after(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = _FakeRuntime(code=0)
    monkeypatch.setattr(pinned, "_loaded_cudart", lambda: runtime)
    host = PinnedHost(pin=True)
    array = host.array((8, 1024))
    address = array.ctypes.data
    assert runtime.registered == [(address, 8 * 1024 * 4, 1)], "the array's own pages, portable"
    assert host.failure is None and host.pinned_bytes == 8 * 1024 * 4
    view = array[:3]
    del array
    gc.collect()
    assert runtime.unregistered == [], "a view still holds the pages"
    del view
    gc.collect()
    assert runtime.unregistered == [address] and host.pinned_bytes == 0


def test_a_refused_pin_leaves_pageable_arrays_and_says_why_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = _FakeRuntime(code=2)
    monkeypatch.setattr(pinned, "_loaded_cudart", lambda: runtime)
    host = PinnedHost(pin=True)
    with caplog.at_level(logging.WARNING, logger="jobbert_onnx"):
        first, second = host.array((4, 16)), host.array((4, 16))
    assert host.failure == "cudaHostRegister failed: error 2" and host.pinned_bytes == 0
    assert len(runtime.registered) == 1, "not tried again"
    assert [r.getMessage() for r in caplog.records if "page-locked" in r.getMessage()] == [
        "the vectors' host buffers could not be page-locked (cudaHostRegister failed: error 2); they stay "
        "pageable: the same vectors, a slower copy off the device"
    ]
    assert first.shape == second.shape == (4, 16)


def test_without_a_cuda_runtime_in_the_process_nothing_is_loaded_to_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    # A name no process has loaded (this one may hold the toolkit's runtime: onnxruntime's
    # preload_dlls() loads it when the tests ask whether CUDA can run).
    monkeypatch.setattr(pinned, "CUDART_NAMES", ("libcudart.so.99",))
    host = PinnedHost(pin=True)
    host.array((2, 2))
    assert host.failure == "no CUDA runtime is loaded in this process"
    assert PinnedHost(pin=False).failure == "not on CUDA"


def test_the_real_cuda_runtime_is_found_once_loaded_and_its_refusal_named() -> None:
    """In a child process: the CUDA runtime library this machine has (the CUDA toolkit's), loaded
    as onnxruntime's CUDA provider would load it, is found without loading another; with no GPU
    driver here it refuses to page-lock, and the refusal is named in the runtime's own words."""
    script = """
import ctypes, glob, json, sys
from jobbert_onnx.runtime import pinned
found = sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so.1[0-9]"))
if not found:
    print(json.dumps({"skip": "no CUDA runtime library in /usr/local/cuda*/lib64"})); sys.exit()
before = pinned._loaded_cudart()
ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)
host = pinned.PinnedHost(pin=True)
array = host.array((4, 1024))
print(json.dumps({"before": before is not None, "after": pinned._loaded_cudart() is not None,
                  "failure": host.failure, "pinned": host.pinned_bytes, "shape": list(array.shape)}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    if "skip" in seen:
        pytest.skip(seen["skip"])
    assert not seen["before"] and seen["after"], "found only once loaded: never loads a runtime of its own"
    if seen["failure"] is None:  # a GPU and its driver: really page-locked
        assert seen["pinned"] == 4 * 1024 * 4
    else:
        assert seen["failure"].startswith("cudaHostRegister failed: cudaError") and seen["pinned"] == 0, seen
    assert seen["shape"] == [4, 1024]


def test_host_output_needs_reused_buffers_and_no_cuda_graphs() -> None:
    assert Tuning(host_output=True).resolve("cpu", 64).reuse_buffers is True
    assert Tuning().resolve("cuda", 64).host_output is False, "off until the GPU proof measures it"
    with pytest.raises(ValueError, match="host_output=True and cuda_graphs=True exclude each other"):
        Tuning(host_output=True, cuda_graphs=True).resolve("cuda", 64)
