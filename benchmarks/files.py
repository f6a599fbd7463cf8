"""Results files that are whole at every moment: a run killed mid-write leaves the last complete version."""

from __future__ import annotations

import os
from pathlib import Path


def write_whole(path: Path, text: str) -> None:
    """Write `text` to `path` by renaming a finished copy over it (one extra file in the folder, briefly)."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
