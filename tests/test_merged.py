"""The merged graph (`export --merged`): encoder, pooling and every head in one graph, one run per batch.

On the CPU provider it runs the same nodes as the chain, so its vectors must be the chain's
bit for bit; on CUDA it is the default where an export has it (tests/test_gpu.py measures it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import _quiet, assert_close, parity_texts

from jobbert_onnx import Encoder, ManifestError, Tuning
from jobbert_onnx.export import export_model
from jobbert_onnx.manifest import merged_file, read_manifest
from jobbert_onnx.runtime.chain import uses_merged
from jobbert_onnx.runtime.sessions import Device

# fp16 on the CPU runs through casts and says so; here it is what is being compared.
pytestmark = pytest.mark.filterwarnings("ignore:running the fp16 variant on the CPU")


@pytest.fixture(scope="module")
def merged_export(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("merged") / "export"
    export_model(str(tiny_models["router"]), folder, precision="fp16", merged=True, log=_quiet)
    return folder


def test_the_export_writes_and_validates_the_merged_graph(merged_export: Path) -> None:
    manifest = read_manifest(merged_export)
    variant = manifest.variants["fp16"]
    assert variant.merged_file == merged_file("fp16") and variant.merged_file in manifest.files
    merged = variant.validation["merged"]
    assert set(merged["heads"]) == {"anchor", "positive"}
    assert all(head["min_cosine"] >= variant.validation["min_cosine_required"] for head in merged["heads"].values())
    session = ort.InferenceSession(str(merged_export / variant.merged_file), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["embedding_anchor", "embedding_positive"]


def test_the_merged_graph_gives_the_chains_vectors_in_one_run_per_batch(merged_export: Path) -> None:
    chain = Encoder.load(merged_export, device="cpu", precision="fp16", tuning=Tuning(merged=False))
    merged = Encoder.load(merged_export, device="cpu", precision="fp16", tuning=Tuning(merged=True))
    assert merged.chain.merged and not chain.chain.merged
    runs = []
    session = merged.chain.encoder
    real = session.run_with_iobinding

    def counted(binding: ort.IOBinding, options: ort.RunOptions | None = None) -> None:
        runs.append(1)
        real(binding, options)

    session.run_with_iobinding = counted  # type: ignore[method-assign]
    texts = parity_texts()
    for task in ("anchor", "positive"):
        before = len(runs)
        got = merged.encode(texts, task=task, batch_size=8)
        assert np.array_equal(got, chain.encode(texts, task=task, batch_size=8)), task
        batches = len(merged._plans(merged.tokenizer.tokenize(texts), 8))
        assert len(runs) - before == batches, "one run per batch"
        alone = np.stack([merged.encode(text, task=task) for text in texts[:12]])
        assert_close(got[:12], alone, 1e-6, f"{task}: a text's vector does not depend on its batch")
    host = Encoder.load(merged_export, device="cpu", precision="fp16", tuning=Tuning(merged=True, host_output=True))
    for task in ("anchor", "positive"):  # each route's head output has a host buffer of its own
        assert np.array_equal(host.encode(texts, task=task, batch_size=8), chain.encode(texts, task=task, batch_size=8))


def test_the_merged_graph_is_cudas_default_and_never_the_cpus(merged_export: Path, tiny_exports: dict) -> None:
    merged = read_manifest(merged_export).variants["fp16"]
    plain = read_manifest(tiny_exports[("router", "fp16")]).variants["fp16"]
    cuda, cpu = Tuning().resolve("cuda", 64), Tuning().resolve("cpu", 64)
    assert uses_merged(cuda, merged, Device("cuda")) and not uses_merged(cpu, merged, Device("cpu"))
    assert not uses_merged(cuda, plain, Device("cuda")), "an export without it runs the chain"
    off = Tuning(merged=False).resolve("cuda", 64)
    assert not uses_merged(off, merged, Device("cuda"))
    with pytest.raises(ValueError, match="no merged fp16 graph: export it again with --merged"):
        Encoder.load(tiny_exports[("router", "fp16")], device="cpu", precision="fp16", tuning=Tuning(merged=True))


def test_merged_asks_for_fp16(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--merged applies to the fp16 variant"):
        export_model(str(tiny_models["router"]), tmp_path / "x", precision="fp32", merged=True, log=_quiet)
    assert not (tmp_path / "x").exists()


def test_a_damaged_merged_graph_is_refused_where_it_would_run(merged_export: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(merged_export, copy)
    path = copy / merged_file("fp16")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=merged_file("fp16")):
        Encoder.load(copy, device="cpu", precision="fp16", tuning=Tuning(merged=True))
    Encoder.load(copy, device="cpu", precision="fp16")  # the chain does not read it
    raw = json.loads((copy / "manifest.json").read_text())
    del raw["files"][merged_file("fp16")]
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=f"does not list {merged_file('fp16')}"):
        read_manifest(copy)
