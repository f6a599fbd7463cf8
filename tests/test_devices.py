"""Where the graphs run: CUDA's libraries checked by name, and no silent CPU where CUDA is required."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from jobbert_onnx import DeviceError, Encoder
from jobbert_onnx.export import export_model
from jobbert_onnx.runtime import sessions
from jobbert_onnx.runtime.sessions import REQUIRE_CUDA_ENV, _cuda_blocker


class _Libraries:
    """Stands in for ctypes.CDLL: loads what is listed, refuses the rest as the dynamic loader would."""

    def __init__(self, missing: str | None, failing_path: str | None = None) -> None:
        self.missing = missing
        self.failing_path = failing_path
        self.asked: list[str] = []

    def __call__(self, name: str, *args: object, **kwargs: object) -> object:
        self.asked.append(name)
        if self.failing_path is not None and name.endswith(self.failing_path):
            raise OSError(f"{self.missing}: cannot open shared object file: No such file or directory")
        if self.missing is not None and name.endswith(self.missing):
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")
        return object()


def _pretend_gpu_build(monkeypatch: pytest.MonkeyPatch, libraries: _Libraries) -> None:
    monkeypatch.setattr(sessions.ort, "get_available_providers", lambda: [sessions.CUDA, sessions.CPU])
    monkeypatch.setattr(sessions.ctypes, "CDLL", libraries)


@pytest.mark.parametrize("missing", ["libcublasLt.so.13", "libcudart.so.13", "libcudnn.so.9"])
def test_a_missing_cuda_library_is_named(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    # The provider library fails on its first missing dependency; cuDNN is loaded on its own.
    via_provider = None if missing == "libcudnn.so.9" else "libonnxruntime_providers_cuda.so"
    _pretend_gpu_build(monkeypatch, _Libraries(missing, via_provider))
    blocker = _cuda_blocker()
    assert blocker is not None and f"but {missing} did not load" in blocker, blocker
    assert "pip install 'onnxruntime-gpu[cuda,cudnn]'" in blocker


def test_cuda_is_worth_trying_when_every_library_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    libraries = _Libraries(missing=None)
    _pretend_gpu_build(monkeypatch, libraries)
    assert _cuda_blocker() is None
    assert libraries.asked[0] == "libcuda.so.1"
    assert any(name.endswith("libonnxruntime_providers_cuda.so") for name in libraries.asked)
    assert "libcudnn.so.9" in libraries.asked


def test_no_driver_is_said_before_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend_gpu_build(monkeypatch, _Libraries("libcuda.so.1"))
    assert "no NVIDIA driver" in str(_cuda_blocker())


def test_this_machines_missing_library_is_a_real_name() -> None:
    """On a CPU machine with onnxruntime-gpu (this project's install), the real loader names what is missing."""
    if sessions.CUDA not in sessions.ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider to load")
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        missing = sessions.missing_cuda_library()
        assert missing is not None and ".so" in missing and "/" not in missing, missing
    else:
        pytest.skip("a driver is present; the GPU tests cover this machine")


def test_auto_fails_instead_of_falling_back_when_cuda_is_required(
    tiny_exports: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    if _cuda_blocker() is None:
        pytest.skip("CUDA is usable on this machine; auto gets it")
    monkeypatch.setenv(REQUIRE_CUDA_ENV, "1")
    with pytest.raises(DeviceError, match=f"{REQUIRE_CUDA_ENV} is set, so device='auto' must get CUDA"):
        Encoder.load(tiny_exports[("router", "fp32")], device="auto")
    assert Encoder.load(tiny_exports[("router", "fp32")], device="cpu").device.kind == "cpu", "cpu stays cpu"
    monkeypatch.setenv(REQUIRE_CUDA_ENV, "0")
    with pytest.warns(RuntimeWarning, match="runs on the CPU"):
        Encoder.load(tiny_exports[("router", "fp32")], device="auto")


@pytest.mark.slow
def test_export_validation_says_where_it_ran(
    tiny_models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if _cuda_blocker() is None:
        pytest.skip("CUDA is usable on this machine; validation runs there")
    lines: list[str] = []
    manifest = export_model(str(tiny_models["router"]), tmp_path / "auto", precision="fp16", log=lines.append)
    reason = manifest["validation"]["cuda_unusable"]
    assert reason == _cuda_blocker()
    assert any(line.startswith("CUDA is not usable, so fp16 and fp32 are validated on the CPU") for line in lines)
    assert any("not fp16 arithmetic" in line for line in lines)

    monkeypatch.setenv(REQUIRE_CUDA_ENV, "1")
    with pytest.raises(DeviceError, match="must get CUDA"):
        export_model(str(tiny_models["router"]), tmp_path / "required", precision="fp16", log=lines.append)
    assert not (tmp_path / "required").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["auto"], "no half-written folder is left"


def test_cuda_sessions_ask_for_fp32_not_tf32_and_a_tight_arena() -> None:
    (provider, options), cpu = sessions.Device("cuda", 1).providers()
    assert (provider, cpu) == (sessions.CUDA, sessions.CPU)
    assert options == {"device_id": "1", "arena_extend_strategy": "kSameAsRequested", "use_tf32": "0"}
    assert sessions.Device("cuda").providers(cuda_graphs=True)[0][1]["enable_cuda_graph"] == "1"
    assert sessions.Device("cpu").providers() == [sessions.CPU]
