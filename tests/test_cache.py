"""Loading by hub id or sentence-transformers folder: exported once into the cache, then reused.

The hub is never reached: hub ids are served from a hub cache built here, laid out
as huggingface_hub lays it out, with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobbert_onnx import Encoder
from jobbert_onnx.cache import CACHE_ENV, default_cache_dir, resolve_model
from jobbert_onnx.errors import JobbertOnnxError, SourceUnavailableError, UsageError
from jobbert_onnx.manifest import MANIFEST_NAME, ManifestError, sha256_file

REPO = "TechWolf/JobBERT-v3"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEXTS = ["Software Engineer", "Koch", "python, sql"]
ROOT = Path(__file__).resolve().parent.parent


def _hub_cache(model: Path, hf_home: Path) -> Path:
    """`model` as huggingface_hub caches a download of REPO at COMMIT: blobs named by their
    sha256, a snapshot of links to them, and refs/main pointing at the commit."""
    repo = hf_home / "hub" / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / COMMIT
    for path in sorted(model.rglob("*")):
        if path.is_file():
            blob = repo / "blobs" / sha256_file(path)
            if not blob.exists():
                shutil.copyfile(path, blob)
            link = snapshot / path.relative_to(model)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    return repo


def _python(script: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in (CACHE_ENV, "HF_HOME", "HF_HUB_OFFLINE")}
    return subprocess.run(
        [sys.executable, "-c", script], env={**clean, **env}, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _last_json(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture()
def source(tiny_models: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the tiny router model that a test may change."""
    return Path(shutil.copytree(tiny_models["router"], tmp_path / "model"))


def test_a_folder_is_exported_once_then_reused(source: Path, tmp_path: Path, encoder_fp32: Encoder) -> None:
    cache = tmp_path / "cache"
    first = resolve_model(source, precision="fp32", cache_dir=cache)
    again = resolve_model(source, precision="fp32", cache_dir=cache)
    assert first.exported and not again.exported and again.folder == first.folder
    assert first.folder.parent == cache / "exports"
    loaded = Encoder.load(source, device="cpu", precision="fp32", cache_dir=cache)
    assert loaded.manifest.folder == first.folder
    np.testing.assert_allclose(loaded.encode(TEXTS), encoder_fp32.encode(TEXTS), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_changed_weights_are_exported_again(source: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    cache = tmp_path / "cache"
    before = Encoder.load(source, device="cpu", precision="fp32", cache_dir=cache).encode(TEXTS, task="anchor")
    for weights in (source / "2_Router").rglob("model.safetensors"):  # both heads' biases move
        state = load_file(str(weights))
        save_file(
            {name: value + 0.5 if name.endswith("bias") else value for name, value in state.items()}, str(weights)
        )
    resolved = resolve_model(source, precision="fp32", cache_dir=cache)
    assert resolved.exported, "the cached export no longer matches the weights"
    after = Encoder.load(source, device="cpu", precision="fp32", cache_dir=cache).encode(TEXTS, task="anchor")
    assert not np.allclose(before, after, atol=1e-3)


def test_a_changed_configuration_is_exported_again(source: Path, tmp_path: Path) -> None:
    """Same weights, another length cap: the cached export would give other vectors, so it is not reused."""
    cache = tmp_path / "cache"
    long = ["python, sql, " * 20]
    before = Encoder.load(source, device="cpu", precision="fp32", cache_dir=cache)
    config = source / "sentence_bert_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_seq_length": 16}))
    resolved = resolve_model(source, precision="fp32", cache_dir=cache)
    assert resolved.exported, "the cached export no longer matches the configuration"
    after = Encoder.load(source, device="cpu", precision="fp32", cache_dir=cache)
    assert (before.max_seq_length, after.max_seq_length) == (64, 16)
    assert not np.allclose(before.encode(long), after.encode(long), atol=1e-3)
    assert not resolve_model(source, precision="fp32", cache_dir=cache).exported, "and then reused"


def test_an_export_folder_is_used_as_it_is(tiny_exports: dict, tmp_path: Path) -> None:
    folder = tiny_exports[("router", "fp32")]
    resolved = resolve_model(folder, cache_dir=tmp_path / "cache")
    assert resolved.folder == folder and not resolved.exported
    assert not (tmp_path / "cache").exists()
    with pytest.raises(UsageError, match="revision applies to hub ids"):
        resolve_model(folder, revision="main")


def test_what_is_neither_a_model_nor_a_hub_id_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ManifestError, match="not a jobbert-onnx export, nor a sentence-transformers folder"):
        resolve_model(tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(ManifestError, match="is not a folder, nor a hub id"):
        resolve_model(str(tmp_path / "missing"), cache_dir=tmp_path / "cache")
    with pytest.raises(UsageError, match="unknown precision 'int3'"):
        resolve_model(REPO, precision="int3", cache_dir=tmp_path / "cache")


def test_the_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (CACHE_ENV, "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "jobbert-onnx"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "jobbert-onnx"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert default_cache_dir() == tmp_path / "hf" / "jobbert-onnx"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


@pytest.mark.slow
def test_a_hub_id_offline_exports_from_the_hub_cache_then_loads_without_it(
    tiny_models: dict[str, Path], tmp_path: Path, encoder_fp32: Encoder
) -> None:
    hub_repo = _hub_cache(tiny_models["router"], tmp_path / "hf")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", CACHE_ENV: str(tmp_path / "cache")}
    script = f"""
import json
from jobbert_onnx import Encoder
from jobbert_onnx.cache import resolve_model
resolved = resolve_model({REPO!r}, precision="fp32")
vectors = Encoder.load({REPO!r}, device="cpu", precision="fp32").encode({TEXTS!r})
print(json.dumps({{"exported": resolved.exported, "folder": str(resolved.folder), "vectors": vectors.tolist()}}))
"""
    first = _last_json(_python(script, env))
    assert first["exported"]
    np.testing.assert_allclose(np.array(first["vectors"]), encoder_fp32.encode(TEXTS), atol=1e-6, rtol=0)
    manifest = json.loads((Path(first["folder"]) / MANIFEST_NAME).read_text())
    assert manifest["source"]["model"] == REPO and manifest["source"]["revision"] == COMMIT

    again = _last_json(_python(script, env))
    assert not again["exported"] and again["folder"] == first["folder"]

    shutil.rmtree(hub_repo)  # the hub cache is gone: the cached export still loads, offline
    gone = _last_json(_python(script, env))
    assert not gone["exported"] and gone["folder"] == first["folder"]


def test_offline_with_nothing_cached_says_what_to_do(tmp_path: Path) -> None:
    script = f"""
from jobbert_onnx import Encoder
Encoder.load({REPO!r}, device="cpu")
"""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", CACHE_ENV: str(tmp_path / "cache")}
    result = _python(script, env)
    assert result.returncode != 0
    assert (
        "SourceUnavailableError" in result.stderr
        and "HF_HUB_OFFLINE" in result.stderr
        and "network access" in result.stderr
    )


# What the [export] extra brings, made unimportable: the runtime-only install.
RUNTIME_ONLY = (
    "import sys\nfor name in ('torch', 'onnx', 'transformers', 'huggingface_hub'): sys.modules[name] = None\n"
)


@pytest.mark.parametrize("kind", ["hub id", "folder"])
def test_without_the_export_extra_exporting_names_the_extra(source: Path, tmp_path: Path, kind: str) -> None:
    model = REPO if kind == "hub id" else str(source)
    script = RUNTIME_ONLY + f"from jobbert_onnx import Encoder\nEncoder.load({model!r}, device='cpu')\n"
    result = _python(script, {CACHE_ENV: str(tmp_path / "cache")})
    assert result.returncode != 0
    assert "MissingExtraError" in result.stderr and "pip install 'jobbert-onnx[export]'" in result.stderr


def test_without_the_export_extra_a_cached_export_loads(source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    made = resolve_model(source, precision="fp32", cache_dir=cache)
    script = RUNTIME_ONLY + (
        "import json\nfrom jobbert_onnx import Encoder\n"
        f"enc = Encoder.load({str(source)!r}, device='cpu', precision='fp32')\n"
        "print(json.dumps({'folder': str(enc.manifest.folder)}))\n"
    )
    assert _last_json(_python(script, {CACHE_ENV: str(cache)}))["folder"] == str(made.folder)


@pytest.mark.slow
def test_two_processes_racing_export_once(source: Path, tmp_path: Path) -> None:
    script = f"""
import json
from jobbert_onnx.cache import resolve_model
resolved = resolve_model({str(source)!r}, precision="fp32")
print(json.dumps({{"exported": resolved.exported, "folder": str(resolved.folder)}}))
"""
    env = {**os.environ, CACHE_ENV: str(tmp_path / "cache")}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = []
    for racer in racers:
        out, err = racer.communicate(timeout=600)
        assert racer.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["exported"] for r in results) == [False, True], "one exports, the other waits and reuses it"
    assert results[0]["folder"] == results[1]["folder"]


@pytest.mark.slow
def test_a_failed_export_leaves_no_entry(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobbert_onnx.export import pipeline

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("interrupted")

    cache = tmp_path / "cache"
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "validate_export", broken)
        with pytest.raises(RuntimeError, match="interrupted"):
            resolve_model(source, precision="fp32", cache_dir=cache)
    assert not list((cache / "exports").glob(f"*/{MANIFEST_NAME}"))
    assert resolve_model(source, precision="fp32", cache_dir=cache).exported


@pytest.mark.slow
def test_a_killed_export_is_cleaned_up_by_the_next(source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    script = f"""
import os, signal
from jobbert_onnx.export import graphs
from jobbert_onnx.cache import resolve_model
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
graphs.write_pooling = killed
resolve_model({str(source)!r}, precision="fp32", cache_dir={str(cache)!r})
"""
    result = _python(script, {})
    assert result.returncode == -9, result.stderr[-3000:]
    left = list((cache / "exports").glob(".*.partial-*"))
    assert left, "the killed export left its work folder"
    assert list(left[0].glob(".trace/encoder.*.onnx")), "the encoder's trace lies in that folder, not elsewhere"
    resolved = resolve_model(source, precision="fp32", cache_dir=cache)
    assert resolved.exported and (resolved.folder / MANIFEST_NAME).is_file()
    assert not list((cache / "exports").glob(".*.partial-*")), "the next export removed what the killed one left"


@pytest.mark.slow
def test_the_cli_takes_a_model_folder_and_a_cache_dir(source: Path, tmp_path: Path, encoder_fp32: Encoder) -> None:
    out = tmp_path / "v.npy"
    result = subprocess.run(
        [sys.executable, "-m", "jobbert_onnx.cli", "encode", str(source), "Koch", "Chef", "--device", "cpu",
         "--precision", "fp32", "--cache-dir", str(tmp_path / "cache"), "-o", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "exporting" in result.stderr and "into the cache" in result.stderr
    np.testing.assert_allclose(np.load(out), encoder_fp32.encode(["Koch", "Chef"]), atol=1e-6, rtol=0)


def test_every_error_a_user_can_fix_is_one_family() -> None:
    assert issubclass(SourceUnavailableError, JobbertOnnxError)
    from jobbert_onnx import DeviceError, ManifestError
    from jobbert_onnx.batch.embed import EmbedError
    from jobbert_onnx.batch.match import MatchError
    from jobbert_onnx.batch.reader import InputError
    from jobbert_onnx.export import ExportValidationError, UnsupportedModelError

    for error in (DeviceError, ManifestError, EmbedError, MatchError, InputError, ExportValidationError):
        assert issubclass(error, JobbertOnnxError), error
    assert issubclass(UnsupportedModelError, JobbertOnnxError) and issubclass(UnsupportedModelError, ValueError)
