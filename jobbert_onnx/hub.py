"""What both the export and the cache need to know of the model hub: its ids, its offline
switch, and the error for a repository or revision that cannot be had.

Standard library only (huggingface_hub is imported where an error is built), so that the
runtime-only install can use it.
"""

from __future__ import annotations

import os
import re

from jobbert_onnx.errors import SourceUnavailableError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_unavailable(repo_id: str, revision: str | None, error: Exception) -> SourceUnavailableError:
    """The error for a hub repository or revision that cannot be had, naming what to do."""
    from huggingface_hub.errors import RevisionNotFoundError

    if isinstance(error, RevisionNotFoundError):
        return SourceUnavailableError(f"{repo_id} has no revision {revision!r}; pass a branch, tag or commit it has")
    return SourceUnavailableError(
        f"{repo_id} is not on the hub, or it is private or gated and no token is set (huggingface-cli login)"
    )
