"""Load by hub id or sentence-transformers folder: export once into a cache, reuse it after.

This sits above both the exporter and the runtime: the runtime knows export folders
only. `resolve_model` turns what a user passes to `jobbert_onnx.Encoder.load` (or to a
CLI's MODEL argument) into an export folder:

- an export folder (it holds ``manifest.json``) is used as it is;
- a sentence-transformers folder, or a hub id such as ``TechWolf/JobBERT-v3``
  (with a `revision`), is exported once into the cache, then reused.

A cache entry is keyed by the source (hub id, or the folder's absolute path), the
resolved revision (the commit a hub branch or tag points at) and the encoder
precisions. An entry is reused only when its manifest matches the source's weights:
for a local folder the sha256 of each weight file; for a hub id the commit, and
the sha256 of the weights in the local hub cache where they are there.

Processes that ask for the same entry at once take a file lock: one exports, the
others wait and then load its result. The export is assembled under a temporary
name and renamed into place, so a crash leaves no entry that loads; whatever a
killed export left behind is removed by the next one.

Standard library only: the runtime-only install (no ``[export]`` extra) loads
cached entries, and says which extra to install when it would have to export.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobbert_onnx._files import file_lock, write_json
from jobbert_onnx.errors import MissingExtraError, SourceUnavailableError, UsageError
from jobbert_onnx.hub import HUB_ID, hub_offline, hub_unavailable
from jobbert_onnx.manifest import (
    DEFAULT_PRECISIONS,
    MANIFEST_NAME,
    PRECISIONS,
    SCHEMA_VERSION,
    ManifestError,
    sha256_file,
    source_configs,
)

CACHE_ENV = "JOBBERT_ONNX_CACHE"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_ENTRY_FILE = "cache-entry.json"


def default_cache_dir() -> Path:
    """Where exports are cached: ``$JOBBERT_ONNX_CACHE``, else ``$HF_HOME/jobbert-onnx``,
    else ``$XDG_CACHE_HOME/jobbert-onnx``, else ``~/.cache/jobbert-onnx``."""
    for variable, below in ((CACHE_ENV, ""), ("HF_HOME", "jobbert-onnx"), ("XDG_CACHE_HOME", "jobbert-onnx")):
        value = os.environ.get(variable)
        if value:
            return Path(value).expanduser() / below
    return Path.home() / ".cache" / "jobbert-onnx"


def is_export(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


@dataclass(frozen=True)
class Resolved:
    """Where a source's export is, and whether this call had to make it."""

    folder: Path
    exported: bool


def resolve_model(
    source: str | Path,
    *,
    revision: str | None = None,
    precision: str | None = None,
    cache_dir: str | Path | None = None,
    allow_pickle: bool = False,
    log: Callable[[str], None] | None = None,
) -> Resolved:
    """The export folder for `source`, exporting it into the cache on first use.

    Args:
        source: An export folder, a sentence-transformers folder, or a hub id.
        revision: Branch, tag or commit of a hub id.
        precision: The encoder variant the caller will load; the cache entry holds the
            default precisions (fp16, int8), or this one alone if it is not among them.
        cache_dir: The cache (default: `default_cache_dir`).
        allow_pickle: Let the export read ``pytorch_model.bin`` (only for trusted sources).
        log: Receives a line per export step; None: silent.

    Raises:
        ManifestError: `source` is neither an export, a sentence-transformers folder nor a hub id.
        UsageError: `revision` is given with a folder, or `precision` is unknown.
        MissingExtraError: An export is needed and the ``[export]`` extra is not installed.
        SourceUnavailableError: Offline (``HF_HUB_OFFLINE=1``) with no cached export and no hub files to export.
    """
    path = Path(source).expanduser()
    if path.is_dir() and is_export(path):
        if revision is not None:
            raise UsageError(f"revision applies to hub ids; {source} is an export folder")
        return Resolved(path, exported=False)
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose from: {', '.join(PRECISIONS)}")
    precisions = DEFAULT_PRECISIONS if precision is None or precision in DEFAULT_PRECISIONS else (precision,)
    if path.exists():
        if not (path / "modules.json").is_file():
            raise ManifestError(
                f"{source} has no {MANIFEST_NAME}, so it is not a jobbert-onnx export, nor a sentence-transformers "
                f"folder (no modules.json); create an export with `jobbert-onnx export SOURCE {source}`, or pass "
                "a sentence-transformers folder or a hub id such as TechWolf/JobBERT-v3"
            )
        if revision is not None:
            raise UsageError(f"revision applies to hub ids; {source} is a local folder")
        source_key, commit = str(path.resolve()), None
    elif HUB_ID.match(str(source)):
        source_key, commit = str(source), _hub_commit(str(source), revision)
    else:
        raise ManifestError(
            f"{source} is not a folder, nor a hub id of the form owner/name (e.g. TechWolf/JobBERT-v3); pass the "
            "output folder of `jobbert-onnx export`, a sentence-transformers folder, or a hub id"
        )
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    pointer = cache / "refs" / f"{_digest(source_key, revision, precisions)}.json"
    if commit is None and not path.exists():
        return _from_pointer(pointer, str(source), revision)
    entry = cache / "exports" / f"{_slug(source_key)}-{_digest(source_key, commit, precisions)}"
    folder = path if path.exists() else None
    if _fresh(entry, folder, commit):
        return Resolved(entry, exported=False)
    with file_lock(entry.with_name(entry.name + ".lock")):
        if _fresh(entry, folder, commit):
            return Resolved(entry, exported=False)
        _remove_leftovers(entry)
        _export(str(folder or source), entry, revision, precisions, allow_pickle, log)
        write_json(entry / _ENTRY_FILE, {"source": source_key, "revision": revision, "commit": commit})
    pointer.parent.mkdir(parents=True, exist_ok=True)
    write_json(pointer, {"source": source_key, "revision": revision, "entry": entry.name})
    return Resolved(entry, exported=True)


def _digest(*parts: Any) -> str:
    text = json.dumps([SCHEMA_VERSION, *(list(p) if isinstance(p, tuple) else p for p in parts)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _slug(source_key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", source_key).strip("-.")[-60:] or "model"


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit `revision` of `repo_id` points at: asked of the hub when online, read from the
    local hub cache when offline; None where neither can tell (or huggingface_hub is missing)."""
    if revision is not None and _COMMIT.match(revision):
        return revision
    try:
        from huggingface_hub import HfApi, constants
    except ImportError:
        return None
    if not hub_offline():
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        try:
            return str(HfApi().model_info(repo_id, revision=revision).sha)
        except (RevisionNotFoundError, RepositoryNotFoundError) as error:
            raise hub_unavailable(repo_id, revision, error) from None
        except Exception:  # no network: fall back to what the local hub cache knows, as huggingface_hub does
            pass
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    return ref.read_text(encoding="utf-8").strip() if ref.is_file() else None


def _from_pointer(pointer: Path, source: str, revision: str | None) -> Resolved:
    """The entry last made for (source, revision, precisions), when the revision cannot be resolved."""
    if pointer.is_file():
        entry = pointer.parent.parent / "exports" / json.loads(pointer.read_text(encoding="utf-8"))["entry"]
        if is_export(entry):
            return Resolved(entry, exported=False)
    what = f"{source}" + (f" (revision {revision})" if revision else "")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise MissingExtraError(
            f"{what} has no cached export here, and exporting it needs the exporter: pip install "
            "'jobbert-onnx[export]' (or run `jobbert-onnx export` where it is installed and pass the export folder)"
        ) from None
    raise SourceUnavailableError(
        f"{what} has no cached export here and its files are not in the local hub cache, and HF_HUB_OFFLINE is set "
        "(or the hub is unreachable): run once with network access, or pass an export folder made elsewhere"
    )


def _fresh(entry: Path, folder: Path | None, commit: str | None) -> bool:
    """True when `entry` is a complete export of the source's current weights and configuration
    (a model saved again, or given a Normalize or another length cap, is exported again)."""
    if not is_export(entry):
        return False
    try:
        source = json.loads((entry / MANIFEST_NAME).read_text(encoding="utf-8"))["source"]
        recorded: dict[str, str] = {**source["weights_sha256"], **source["configs_sha256"]}
        configs = set(source["configs_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if folder is not None:
        if {str(path.relative_to(folder)) for path in source_configs(folder)} != configs:
            return False
        return all(_file_sha256(folder / name) == digest for name, digest in recorded.items())
    if source.get("revision") != commit:
        return False
    snapshot = _hub_snapshot(str(source.get("model")), commit)
    if snapshot is None:  # the weights of a commit cannot change; nothing local to compare
        return True
    return all(_file_sha256(snapshot / name, hub_blob=True) == digest for name, digest in recorded.items())


def _hub_snapshot(repo_id: str, commit: str | None) -> Path | None:
    if commit is None:
        return None
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    snapshot = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _file_sha256(path: Path, hub_blob: bool = False) -> str | None:
    """sha256 of a weight file; in the hub cache a large file's blob is named by its sha256, so
    that name is read instead of the bytes."""
    if not path.is_file():
        return None
    if hub_blob and path.is_symlink():
        name = path.resolve().name
        if re.fullmatch(r"[0-9a-f]{64}", name):
            return name
    return sha256_file(path)


def _remove_leftovers(entry: Path) -> None:
    """Remove what an export killed mid-way left beside `entry` (the lock is held, so none is live)."""
    for leftover in entry.parent.glob(f".{entry.name}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _export(
    source: str,
    entry: Path,
    revision: str | None,
    precisions: tuple[str, ...],
    allow_pickle: bool,
    log: Callable[[str], None] | None,
) -> None:
    try:
        from jobbert_onnx.export import export_model
    except ImportError as error:
        raise MissingExtraError(
            f"{source} is not exported yet (no cached export in {entry.parent}), and exporting needs "
            f"{error.name or error}: pip install 'jobbert-onnx[export]'"
        ) from None
    say = log or (lambda line: None)
    say(f"exporting {source} into the cache {entry} (once; later loads reuse it)")
    entry.parent.mkdir(parents=True, exist_ok=True)
    export_model(
        source,
        entry,
        revision=revision,
        # A precision the caller asked for by name must pass its gate; the defaults may drop one.
        precision=None if precisions == DEFAULT_PRECISIONS else precisions,
        overwrite=True,
        log=say,
        allow_pickle=allow_pickle,
    )
