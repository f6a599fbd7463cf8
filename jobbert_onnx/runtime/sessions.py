"""The one place that builds onnxruntime sessions and decides where they run.

CUDA is checked before a session is built (provider compiled in, driver
present, libraries loadable) and again after (``session.get_providers()``),
because onnxruntime-gpu lists the CUDA provider even where it cannot load and
then silently runs on the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_CUDA_FIX = (
    "pip install 'onnxruntime-gpu[cuda,cudnn]' "
    "(or install the CUDA and cuDNN versions this onnxruntime-gpu was built for)"
)


class DeviceError(RuntimeError):
    """The requested device cannot be used."""


@dataclass(frozen=True)
class Device:
    """Where the graphs run: ``cpu``, or ``cuda`` with a device id."""

    kind: str
    index: int = 0

    def providers(self, cuda_graphs: bool = False) -> list[str | tuple[str, dict[str, str]]]:
        if self.kind == "cuda":
            # The arena grows by what is asked, not to the next power of two (which can
            # hold twice the memory a large batch needs).
            options = {"device_id": str(self.index), "arena_extend_strategy": "kSameAsRequested"}
            if cuda_graphs:
                options["enable_cuda_graph"] = "1"
            return [(CUDA, options), CPU]
        return [CPU]

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"


def parse_device(device: str) -> tuple[str, int]:
    """Split ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into kind and index."""
    if not isinstance(device, str):
        raise TypeError(
            f"device must be a string such as 'auto', 'cuda', 'cuda:1' or 'cpu'; got {type(device).__name__}"
        )
    name = device.strip().lower()
    if name in ("auto", "cpu", "cuda"):
        return name, 0
    if name.startswith("cuda:") and name[5:].isdigit():
        return "cuda", int(name[5:])
    raise ValueError(f"unknown device {device!r}; use 'auto', 'cuda', 'cuda:N' or 'cpu'")


def _cuda_blocker() -> str | None:
    """Why CUDA cannot be used here, or None if it is worth trying."""
    if CUDA not in ort.get_available_providers():
        return (
            f"the installed onnxruntime {ort.__version__} has no CUDA provider: "
            "pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu[cuda,cudnn]'"
        )
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver was found (libcuda.so.1 did not load), so there is no GPU to run on"
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        # preload_dlls() finds the CUDA/cuDNN libraries of the nvidia-* pip packages;
        # it reports problems with print(), which we keep out of the user's stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            preload()
    return None


def session_options(threads: int | None = None, spinning: bool = False) -> ort.SessionOptions:
    """Options for every session.

    Spinning is off by default: the graphs run one after another, and a
    finished session's threads spinning for more work steal the cores the
    next session needs. On two cores, titles with int8 at batch 32 ran at
    323 texts/s without spinning and 202 with; single skill lists took 24 ms
    instead of 54 (benchmarks/RESULTS.md).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def create_session(
    path: Path,
    device: Device,
    threads: int | None = None,
    spinning: bool = False,
    cuda_graphs: bool = False,
) -> ort.InferenceSession:
    """Build a session for one graph on `device`, and prove it runs there.

    Raises:
        DeviceError: CUDA was asked for and the session did not get it.
    """
    options = session_options(threads, spinning)
    session = ort.InferenceSession(str(path), options, providers=device.providers(cuda_graphs))
    if device.kind == "cuda" and session.get_providers()[0] != CUDA:
        raise DeviceError(
            f"onnxruntime-gpu {ort.__version__} is installed but the CUDA provider did not load for {path.name} "
            f"(it ran on {session.get_providers()}): {_CUDA_FIX}"
        )
    return session


def choose_device(device: str, probe_graph: Path) -> Device:
    """Resolve ``auto``/``cuda``/``cuda:N``/``cpu`` to a device that works here.

    ``auto`` takes CUDA when a session on `probe_graph` really gets it, and
    otherwise falls back to the CPU with a warning (shown once per place it is
    called from). An explicit ``cuda`` that cannot be had is an error naming the fix.
    """
    kind, index = parse_device(device)
    if kind == "cpu":
        return Device("cpu")
    blocker = _cuda_blocker()
    if blocker is None:
        try:
            create_session(probe_graph, Device("cuda", index))
            return Device("cuda", index)
        except DeviceError as error:
            blocker = str(error)
    if kind == "cuda":
        raise DeviceError(f"device={device!r} was asked for but CUDA cannot be used: {blocker}")
    warnings.warn(f"jobbert-onnx runs on the CPU: {blocker}", RuntimeWarning, stacklevel=3)
    return Device("cpu")
