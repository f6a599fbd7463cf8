"""The packed fp16 encoder (`export --packed`): no padding inside, CUDA kernels only.

On the CPU the export writes it and says it could not validate it, and the runtime
refuses to run it; tests/test_gpu.py compares it with PyTorch on a GPU.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import pytest
from conftest import _quiet

from jobbert_onnx import Encoder, Tuning
from jobbert_onnx.export import export_model
from jobbert_onnx.export.validate import PACKED_ON_CPU
from jobbert_onnx.manifest import packed_file, read_manifest

# The default (padded) fp16 encoder loads on the CPU below, which warns that it runs through casts.
pytestmark = pytest.mark.filterwarnings("ignore:running the fp16 variant on the CPU")


@pytest.fixture(scope="module")
def packed_export(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("packed") / "export"
    export_model(str(tiny_models["router"]), folder, precision="fp16", packed=True, validate_device="cpu", log=_quiet)
    return folder


def test_the_packed_encoder_removes_padding_before_the_first_layer_and_restores_it_after_the_last(
    packed_export: Path,
) -> None:
    manifest = read_manifest(packed_export)
    variant = manifest.variants["fp16"]
    assert variant.packed_file == packed_file("fp16") and variant.packed_file in manifest.files
    graph = onnx.load(str(packed_export / variant.packed_file)).graph
    ops = Counter(node.op_type for node in graph.node)
    layers = manifest.raw["architecture"]["layers"]
    assert (ops["RemovePadding"], ops["RestorePadding"], ops["PackedAttention"], ops["Attention"]) == (1, 1, layers, 0)
    order = [node.op_type for node in graph.node]
    assert order.index("RemovePadding") < order.index("PackedAttention") < order.index("RestorePadding")
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert variant.validation["packed"]["note"] == PACKED_ON_CPU, "the CPU cannot validate it, and says so"
    assert not variant.validation["packed"]["heads"]


def test_the_packed_encoder_is_refused_where_it_cannot_run(packed_export: Path, tiny_exports: dict) -> None:
    with pytest.raises(ValueError, match="packed=True needs device='cuda'"):
        Encoder.load(packed_export, device="cpu", precision="fp16", tuning=Tuning(packed=True))
    with pytest.raises(ValueError, match="exclude each other"):
        Encoder.load(packed_export, device="cpu", precision="fp16", tuning=Tuning(packed=True, merged=True))
    plain = Encoder.load(packed_export, device="cpu", precision="fp16")
    assert plain.chain.encoder.get_inputs()[1].name == "attention_mask", "the padded encoder by default"
