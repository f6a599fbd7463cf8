"""`Encoder`: the runtime's encoder, loaded from an export folder, a hub id or a
sentence-transformers folder.

Resolving a source (and exporting it on a cache miss) sits here, above both the
exporter and the runtime, so that the runtime knows export folders only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from jobbert_onnx import runtime
from jobbert_onnx.cache import resolve_model
from jobbert_onnx.runtime.tuning import Tuning

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations only, so 3.10 runs this

_LOGGER = logging.getLogger("jobbert_onnx")


def _log(line: str) -> None:
    """Export steps of a first load: the first line at WARNING, so that a load that takes
    minutes says why even where logging is not set up; the rest at INFO."""
    _LOGGER.log(logging.WARNING if line.startswith("exporting ") else logging.INFO, line)


class Encoder(runtime.Encoder):
    __doc__ = runtime.Encoder.__doc__

    @classmethod
    def load(
        cls,
        source: str | Path,
        device: str = "auto",
        precision: str | None = None,
        threads: int | None = None,
        *,
        verify: bool = True,
        tuning: Tuning | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        allow_pickle: bool = False,
    ) -> Self:
        """Load an export folder, or a model by hub id or sentence-transformers folder.

        A hub id (``TechWolf/JobBERT-v3``) or a sentence-transformers folder is exported
        once into a cache (which needs the ``[export]`` extra), and later loads reuse that
        export after checking it against the model's weights; see `jobbert_onnx.cache`.
        `device`, `precision`, `threads`, `verify` and `tuning` are the runtime's
        (`jobbert_onnx.runtime.Encoder.load`).

        Args:
            source: An export folder written by `jobbert-onnx export`, a hub id, or a
                sentence-transformers folder.
            revision: Branch, tag or commit, for a hub id.
            cache_dir: Where exports of hub ids and folders are cached (default:
                ``$JOBBERT_ONNX_CACHE``, ``$HF_HOME/jobbert-onnx``, ``$XDG_CACHE_HOME/jobbert-onnx``
                or ``~/.cache/jobbert-onnx``).
            allow_pickle: Let an export read ``pytorch_model.bin`` (only for trusted sources).

        Raises:
            ManifestError, DeviceError, UsageError: As the runtime's `load`.
            MissingExtraError: `source` needs exporting and the ``[export]`` extra is not installed.
            SourceUnavailableError: Offline, with neither a cached export nor the model's files.
        """
        folder = resolve_model(
            source, revision=revision, precision=precision, cache_dir=cache_dir, allow_pickle=allow_pickle, log=_log
        ).folder
        return super().load(folder, device, precision, threads, verify=verify, tuning=tuning)
