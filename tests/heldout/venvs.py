"""Virtual environments for the held-out checks: other releases, installed from PyPI, kept between runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def pip_install(python: Path, packages: Sequence[str]) -> None:
    """``pip install packages`` into `python`'s environment; the error names what failed."""
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run([*pip, *packages], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"pip install {' '.join(packages)} failed: {done.stderr.strip().splitlines()[-1:]}")


def virtual_environment(folder: Path, installs: Sequence[Sequence[str]]) -> Path:
    """A virtual environment in `folder` with each of `installs` pip-installed in turn, made once
    (a marker says it is complete; a half-made one is made again); its python."""
    python = folder / "bin" / "python"
    if (folder / "ready").is_file():
        return python
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    for packages in installs:
        pip_install(python, packages)
    (folder / "ready").write_text("")
    return python
