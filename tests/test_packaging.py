"""`pip install jobbert-onnx` resolves where users are: onnxruntime-gpu where it has wheels
(Linux and Windows on x86-64), the CPU build of onnxruntime everywhere else (macOS, ARM)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
PLATFORMS = {
    "linux x86-64": ({"sys_platform": "linux", "platform_machine": "x86_64"}, "onnxruntime-gpu"),
    "windows x86-64": ({"sys_platform": "win32", "platform_machine": "AMD64"}, "onnxruntime-gpu"),
    "macOS arm64": ({"sys_platform": "darwin", "platform_machine": "arm64"}, "onnxruntime"),
    "macOS x86-64": ({"sys_platform": "darwin", "platform_machine": "x86_64"}, "onnxruntime"),
    "linux aarch64": ({"sys_platform": "linux", "platform_machine": "aarch64"}, "onnxruntime"),
}


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_exactly_one_onnxruntime_per_platform(platform: str) -> None:
    environment, expected = PLATFORMS[platform]
    chosen = [
        requirement.name
        for requirement in map(Requirement, _project()["dependencies"])
        if requirement.name.startswith("onnxruntime")
        and (requirement.marker is None or requirement.marker.evaluate(environment))
    ]
    assert chosen == [expected]


def test_the_license_is_an_spdx_expression() -> None:
    assert _project()["license"] == "MIT"
