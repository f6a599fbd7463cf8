"""The peers' environment: sentence-transformers' ONNX backend and Optimum need transformers < 4.58
(optimum-onnx's pin), so they run in a virtual environment of their own that the benchmark builds.

It uses the same onnxruntime version as this project, so kernels are alike, and
the CPU build of torch 2.13.0 (an unpinned torch would pull CUDA packages).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort

PACKAGES = [
    "torch==2.13.0",
    "transformers>=4.41,<4.58",
    "sentence-transformers>=5.1,<6",
    "optimum-onnx==0.1.0",
    f"onnxruntime=={ort.__version__}",
    "safetensors",
]


# sentence-transformers' OpenVINO backend, which its documentation recommends for CPUs, in an
# environment of its own (optimum-intel pins another optimum than optimum-onnx). NNCF does the
# static int8 calibration. optimum-intel needs torchvision, whose only wheel that imports here
# comes with torch 2.14.1 (a CUDA build of several GB; it runs on the CPU).
OPENVINO_PACKAGES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "transformers>=4.41,<4.58",
    "sentence-transformers>=5.1,<6",
    "optimum-intel[openvino,nncf]==2.2.0",
    "openvino==2026.4.1",
    "nncf==3.4.0",
    "datasets",
    "safetensors",
    f"onnxruntime=={ort.__version__}",  # jobbert_onnx's package imports it (the calibration texts come from it)
]


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_env(venv: Path, packages: list[str] = PACKAGES) -> Path:
    """Create a peers' environment once (`PACKAGES`, or `OPENVINO_PACKAGES`); return its python."""
    python = python_of(venv)
    marker = venv / ".complete"
    if marker.is_file() and marker.read_text() == "\n".join(packages):
        return python
    if venv.exists():
        shutil.rmtree(venv)
    print(f"building a peers' environment in {venv} (one time, a few minutes) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, packages[0]], check=True)  # the local CPU wheel first, so nothing pulls CUDA torch
    subprocess.run([*pip, *packages], check=True)
    marker.write_text("\n".join(packages))
    return python


def quantization_config() -> str:
    """sentence-transformers' int8 preset that fits this CPU (what its docs tell users to pick)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def int8_file_name(preset: str) -> str:
    """The file sentence-transformers' int8 export writes: named after the weights' type (the ``avx2``
    preset quantizes weights to unsigned 8 bits, the others to signed) and the preset."""
    weights = "quint8" if preset == "avx2" else "qint8"
    return f"model_{weights}_{preset}.onnx"


# The HTTP framework of `benchmarks.peer_server` (the same one our server uses).
SERVER_PACKAGES = ["starlette", "uvicorn", "orjson"]


def ensure_server_packages(python: Path) -> None:
    """Add the peer server's framework to the peers' environment if it is missing."""
    probe = subprocess.run([str(python), "-c", "import starlette, uvicorn, orjson"], capture_output=True)
    if probe.returncode != 0:
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, *SERVER_PACKAGES], check=True)
