"""The one place that builds onnxruntime sessions and decides where they run.

CUDA is checked before a session is built (provider compiled in, driver
present, the CUDA provider library and cuDNN loadable, naming the library that
is missing) and again after (``session.get_providers()``), because
onnxruntime-gpu lists the CUDA provider even where it cannot load and then
silently runs on the CPU.

``device="auto"`` falls back to the CPU with a warning. Where that must not
happen (the GPU proof, GPU test runs, an export that must be validated on the
GPU), set ``JOBBERT_ONNX_REQUIRE_CUDA=1``: "auto" then fails with the reason
instead of falling back.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from jobbert_onnx.errors import SetupError, UsageError, WrongTypeError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_CUDA_FIX = (
    "pip install 'onnxruntime-gpu[cuda,cudnn]' "
    "(or install the CUDA and cuDNN versions this onnxruntime-gpu was built for)"
)


# Set to 1 to make device="auto" fail, rather than fall back to the CPU, where CUDA cannot be used.
REQUIRE_CUDA_ENV = "JOBBERT_ONNX_REQUIRE_CUDA"
# The CUDA provider's options for every session:
# - the arena grows by what is asked, not to the next power of two (which can hold twice the
#   memory a large batch needs);
# - no TF32: onnxruntime's CUDA provider rounds fp32 products to TF32 (10-bit mantissa) by
#   default, and what runs in fp32 here is meant as fp32 (the fp32 variant, and the fp16
#   variant's pooling and heads).
CUDA_OPTIONS = {"arena_extend_strategy": "kSameAsRequested", "use_tf32": "0"}
# Loaded by the CUDA provider on first use rather than linked, so a missing one shows only then.
_CUDNN = "libcudnn.so.9"


class DeviceError(SetupError):
    """The requested device cannot be used."""


def cuda_required() -> bool:
    """Whether ``JOBBERT_ONNX_REQUIRE_CUDA`` asks that "auto" never fall back to the CPU."""
    return os.environ.get(REQUIRE_CUDA_ENV, "").strip().lower() not in ("", "0", "false", "no")


@dataclass(frozen=True)
class Device:
    """Where the graphs run: ``cpu``, or ``cuda`` with a device id."""

    kind: str
    index: int = 0

    def providers(self, cuda_graphs: bool = False) -> list[str | tuple[str, dict[str, str]]]:
        if self.kind == "cuda":
            options = {"device_id": str(self.index), **CUDA_OPTIONS}
            if cuda_graphs:
                options["enable_cuda_graph"] = "1"
            return [(CUDA, options), CPU]
        return [CPU]

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"


def parse_device(device: str) -> tuple[str, int]:
    """Split ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into kind and index."""
    if not isinstance(device, str):
        raise WrongTypeError(
            f"device must be a string such as 'auto', 'cuda', 'cuda:1' or 'cpu'; got {type(device).__name__}"
        )
    name = device.strip().lower()
    if name in ("auto", "cpu", "cuda"):
        return name, 0
    if name.startswith("cuda:") and name[5:].isdigit():
        return "cuda", int(name[5:])
    raise UsageError(f"unknown device {device!r}; use 'auto', 'cuda', 'cuda:N' or 'cpu'")


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
    missing = missing_cuda_library()
    if missing is not None:
        return (
            f"onnxruntime-gpu {ort.__version__} (built for CUDA {_built_for_cuda()}) is installed but {missing} "
            f"did not load: {_CUDA_FIX}"
        )
    return None


def missing_cuda_library() -> str | None:
    """The first library the CUDA provider needs that does not load here, or None.

    The provider library is loaded the way onnxruntime will load it, after
    onnxruntime's own preloading of the nvidia-* pip packages, so the answer
    names the real culprit (``libcublasLt.so.13``, ``libcudnn.so.9``...) rather than
    "the CUDA provider did not load".
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        # preload_dlls() finds the CUDA/cuDNN libraries of the nvidia-* pip packages;
        # it reports problems with print(), which we keep out of the user's stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            preload()
    provider = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    for library in (provider, Path(_CUDNN)):
        try:
            ctypes.CDLL(str(library))
        except OSError as error:
            named = re.match(r"\s*([^\s:]+\.so[.\d]*):", str(error))
            return named.group(1) if named else f"{library.name} ({error})"
    return None


def _built_for_cuda() -> str:
    try:
        from onnxruntime.capi import build_and_package_info

        return str(getattr(build_and_package_info, "cuda_version", "?"))
    except ImportError:
        return "?"


def session_options(threads: int | None = None, spinning: bool = False) -> ort.SessionOptions:
    """Options for every session.

    Spinning is off by default: the graphs run one after another, and a
    finished session's threads spinning for more work steal the cores the
    next session needs. On two cores, titles with int8 at batch 32 ran at
    323 texts/s without spinning and 202 with; single skill lists took 24 ms
    instead of 54 (studies/HISTORY.md).
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


def resolve_device(device: str, probe_graph: Path) -> tuple[Device, str | None]:
    """Resolve ``auto``/``cuda``/``cuda:N``/``cpu`` to a device that works here.

    Returns:
        The device, and why CUDA was not taken where ``auto`` fell back to the CPU
        (None otherwise).

    Raises:
        DeviceError: CUDA was asked for (``cuda``, ``cuda:N``, or ``auto`` with
            ``JOBBERT_ONNX_REQUIRE_CUDA=1``) and cannot be used; the message names the fix.
    """
    kind, index = parse_device(device)
    if kind == "cpu":
        return Device("cpu"), None
    blocker = _cuda_blocker()
    if blocker is None:
        try:
            create_session(probe_graph, Device("cuda", index))
            return Device("cuda", index), None
        except DeviceError as error:
            blocker = str(error)
    if kind == "cuda":
        raise DeviceError(f"device={device!r} was asked for but CUDA cannot be used: {blocker}")
    if cuda_required():
        raise DeviceError(
            f"{REQUIRE_CUDA_ENV} is set, so device='auto' must get CUDA; it cannot be used here: {blocker}"
        )
    return Device("cpu"), blocker


def choose_device(device: str, probe_graph: Path) -> Device:
    """`resolve_device`, warning when ``auto`` falls back to the CPU (once per place it is called from)."""
    resolved, fallback = resolve_device(device, probe_graph)
    if fallback is not None:
        warnings.warn(f"jobbert-onnx runs on the CPU: {fallback}", RuntimeWarning, stacklevel=3)
    return resolved
