"""The exporter: graph structure, manifest, both layouts, refusals, and an all-or-nothing output folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from jobbert_onnx import Encoder, ManifestError
from jobbert_onnx.export import ExportValidationError, UnsupportedModelError, export_model
from jobbert_onnx.export import validate as validate_module
from jobbert_onnx.export.source import read_model
from jobbert_onnx.export.validate import allowed_norm_error
from jobbert_onnx.manifest import encoder_file, sha256_file

TINY_LAYERS = 2


def _quiet(_: str) -> None:
    pass


@pytest.mark.parametrize("key", [("router", "fp32"), ("router", "fp16"), ("legacy-asym", "fp32")])
def test_encoder_is_fused(tiny_exports: dict, key: tuple[str, str]) -> None:
    graph = onnx.load(str(tiny_exports[key] / encoder_file(key[1])))
    counts: dict[str, int] = {}
    for node in graph.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    assert counts.get("Attention") == TINY_LAYERS, counts
    if key[1] == "fp16":
        assert counts.get("SkipLayerNormalization") == 2 * TINY_LAYERS, counts
    else:  # split for onnxruntime's CPU provider, where Add + LayerNormalization runs faster
        assert "SkipLayerNormalization" not in counts and counts.get("LayerNormalization") == 2 * TINY_LAYERS + 1
    assert counts.get("BiasGelu", 0) + counts.get("Gelu", 0) + counts.get("FastGelu", 0) == TINY_LAYERS, counts
    assert "Softmax" not in counts and "Erf" not in counts, "unfused attention or GELU left in the graph"


def test_fp16_stores_half_weights_and_keeps_fp32_interfaces(tiny_exports: dict) -> None:
    encoder = onnx.load(str(tiny_exports[("router", "fp16")] / encoder_file("fp16")))
    weights = [i for i in encoder.graph.initializer if len(i.dims) == 2]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    assert encoder.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    for name in ("pooling.onnx", "head_anchor.onnx", "head_positive.onnx"):
        graph = onnx.load(str(tiny_exports[("router", "fp16")] / name))
        assert all(i.data_type != onnx.TensorProto.FLOAT16 for i in graph.graph.initializer), name


def test_axes_are_dynamic(tiny_exports: dict) -> None:
    encoder = onnx.load(str(tiny_exports[("router", "fp32")] / encoder_file("fp32")))
    for value in [*encoder.graph.input, *encoder.graph.output]:
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param, f"{value.name} has fixed batch/sequence axes"


def test_manifest_contents(tiny_models: dict, tiny_exports: dict) -> None:
    folder = tiny_exports[("router", "fp16")]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "jobbert-onnx" and manifest["schema_version"] == 4
    assert list(manifest["variants"]) == ["fp16", "fp32", "int8"] and manifest["opset"] == 17
    source = manifest["source"]
    assert source["model"] == str(tiny_models["router"]) and source["revision"] is None
    assert source["weights_sha256"]["model.safetensors"] == sha256_file(tiny_models["router"] / "model.safetensors")
    assert set(source["weights_sha256"]) == {
        "model.safetensors",
        "2_Router/anchor_0_Dense/model.safetensors",
        "2_Router/positive_0_Dense/model.safetensors",
    }
    arch = manifest["architecture"]
    assert arch | {"layers": 0} == {
        "model_type": "xlm-roberta",
        "layers": 0,
        "hidden_size": 32,
        "attention_heads": 4,
        "intermediate_size": 64,
        "vocab_size": 250_002,
        "max_seq_length": 64,
        "pooling": "mean",
        "output_dim": 1024,
        "routes": ["anchor", "positive"],
        "default_route": "anchor",
        "task_routes": {},
        "catch_all_route": None,
        "normalized": False,
        "include_prompt": True,
        "module": "Router",
    }
    assert source["saved_by"] == "5.1.0"
    assert source["max_seq_length_from"] == "sentence_bert_config.json (max_seq_length)"
    assert source["module_types"][2] == "sentence_transformers.models.Router"
    assert arch["layers"] == TINY_LAYERS
    for package in ("torch", "transformers", "onnx", "onnxruntime"):
        assert manifest["versions"][package], package
    expected_files = {
        "encoder.fp16.onnx",
        "encoder.fp32.onnx",
        "encoder.int8.onnx",
        "pooling.onnx",
        "head_anchor.onnx",
        "head_positive.onnx",
        "tokenizer.json",
    }
    assert set(manifest["files"]) == expected_files
    assert {path.name for path in folder.iterdir()} == expected_files | {"manifest.json"}, "nothing else, no trace"
    for name, facts in manifest["files"].items():
        assert facts["sha256"] == sha256_file(folder / name)
        assert facts["size"] == (folder / name).stat().st_size
    assert manifest["validation"]["passed"] and manifest["validation"]["token_ids_match"]
    required = {"fp16": (0.999, 0.999), "fp32": (0.99999, 0.99999), "int8": (0.98, 0.995)}
    for name, variant in manifest["variants"].items():
        validation = variant["validation"]
        assert variant["file"] == encoder_file(name)
        assert validation["passed"] and validation["device"] == "cpu"
        assert (validation["min_cosine_required"], validation["mean_cosine_required"]) == required[name]
        for route in ("anchor", "positive"):
            head = validation["heads"][route]
            assert required[name][0] <= head["min_cosine"] <= head["mean_cosine"] <= 1.0 + 1e-9, (name, route)
            assert 0.0 <= head["max_norm_error"] <= allowed_norm_error(required[name][0]), (name, route)
    assert manifest["variants"]["fp16"]["nodes"]["Attention"] == TINY_LAYERS
    int8_nodes = manifest["variants"]["int8"]["nodes"]
    assert int8_nodes["MultiHeadAttention"] == TINY_LAYERS and int8_nodes["MatMulIntegerToFloat"] == 4 * TINY_LAYERS
    assert "DynamicQuantizeLinear" not in int8_nodes, "activation scales are per token, never per batch"
    masks = {name: variant["attention_mask"] for name, variant in manifest["variants"].items()}
    assert masks == {"fp16": "lengths-starts", "fp32": "lengths", "int8": "lengths"}
    assert "fp16 arithmetic" in manifest["variants"]["fp16"]["validation"]["note"], "fp16 on the CPU says so"
    assert "note" not in manifest["variants"]["fp32"]["validation"]


def test_lengths_and_starts_are_for_fp16_only(tiny_models: dict, tiny_exports: dict, tmp_path: Path) -> None:
    """Only fp16's attention kernel reads the lengths-and-starts mask right; elsewhere rows attend to padding."""
    from jobbert_onnx.errors import UsageError

    with pytest.raises(UsageError, match="only by fp16's attention kernel.*export fp32 without it"):
        export_model(str(tiny_models["router"]), tmp_path / "x", precision="fp16,fp32", attention_mask="lengths-starts")
    folder = tmp_path / "edited"
    shutil.copytree(tiny_exports[("router", "fp32")], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["variants"]["fp32"]["attention_mask"] = "lengths-starts"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="the fp32 encoder takes its mask as lengths and starts"):
        Encoder.load(folder, device="cpu", precision="fp32")


def test_legacy_layout_is_read(tiny_models: dict) -> None:
    spec = read_model(str(tiny_models["legacy-asym"]))
    assert spec.router_kind == "Asym" and spec.default_route == "anchor"
    assert spec.heads["anchor"].folder.name == "6235903824_Dense"


def _copy(model: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(model, target)
    return target


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _cls_pooling(folder: Path) -> None:
    _edit_json(folder / "1_Pooling" / "config.json", pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)


def _missing_head(folder: Path) -> None:
    config = folder / "2_Router" / "router_config.json"
    data = json.loads(config.read_text())
    del data["structure"]["positive"]
    config.write_text(json.dumps(data))


def _wrong_dense(folder: Path) -> None:
    _edit_json(folder / "2_Router" / "anchor_0_Dense" / "config.json", in_features=768)


def _relu_dense(folder: Path) -> None:
    _edit_json(
        folder / "2_Router" / "positive_0_Dense" / "config.json", activation_function="torch.nn.modules.activation.ReLU"
    )


def _distilbert_encoder(folder: Path) -> None:
    _edit_json(folder / "config.json", model_type="distilbert")


def _pad_disagrees(folder: Path) -> None:
    _edit_json(folder / "config.json", pad_token_id=5)


def _pickled_weights(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def _extra_module(folder: Path) -> None:
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_cls_pooling, r"uses \['pooling_mode_cls_token'\]; only mean pooling"),
        (_missing_head, r"has routes \['anchor'\]; JobBERT-v3 has exactly \['anchor', 'positive'\]"),
        (
            _wrong_dense,
            r"head 'anchor' .* is Dense\(in_features=768, out_features=1024.*expected Dense\(in_features=32",
        ),
        (_relu_dense, r"activation=torch.nn.modules.activation.ReLU"),
        (_distilbert_encoder, r"model_type 'distilbert'.*supports 'xlm-roberta', 'bert'"),
        (_pad_disagrees, r"tokenizer pads with id 1 \('<pad>'\) but .*config.json has pad_token_id 5"),
        (
            _pickled_weights,
            r"model.safetensors is missing and only pytorch_model.bin \(pickle\) is there.*--allow-pickle",
        ),
        (_extra_module, r"lists Transformer -> Pooling -> Router -> Dense \(.*\); the exporter reads Transformer"),
    ],
)
def test_other_layouts_are_refused(tiny_models: dict, tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    folder = _copy(tiny_models["router"], tmp_path)
    mutate(folder)
    with pytest.raises(UnsupportedModelError, match=message):
        export_model(str(folder), tmp_path / "out", log=_quiet)
    assert not (tmp_path / "out").exists()


def test_source_that_is_neither_folder_nor_hub_id(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="neither an existing folder nor a hub id"):
        read_model(str(tmp_path / "no such folder"))
    with pytest.raises(UnsupportedModelError, match="--revision applies to hub ids only"):
        read_model(str(tmp_path), revision="main")


def test_hub_id_is_downloaded_with_revision(tiny_models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "snapshots" / commit
    shutil.copytree(tiny_models["router"], snapshot)
    calls = []

    def fake_snapshot_download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> str:
        calls.append((repo_id, revision, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    spec = read_model("TechWolf/JobBERT-v3", revision="v1.0")
    assert calls[0][:2] == ("TechWolf/JobBERT-v3", "v1.0")
    assert "*.safetensors" in calls[0][2] and not any(p.endswith(".bin") for p in calls[0][2])
    assert spec.revision == commit and spec.source == "TechWolf/JobBERT-v3"


def test_non_empty_output_is_not_overwritten(tiny_models: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_model(str(tiny_models["router"]), out, log=_quiet)
    with pytest.raises(FileExistsError, match="not a jobbert-onnx export"):
        export_model(str(tiny_models["router"]), out, overwrite=True, log=_quiet)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="is a file; choose a folder"):
        export_model(str(tiny_models["router"]), out / "notes.txt", overwrite=True, log=_quiet)


@pytest.mark.slow
def test_failed_validation_leaves_nothing_that_loads(
    tiny_models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(validate_module.REQUIRED_COSINE, "int8", (0.97, 1.5))  # no export can reach this mean
    with pytest.raises(ExportValidationError, match=r"int8 head 'anchor': mean cosine .* < 1.5") as failure:
        export_model(
            str(tiny_models["router"]), tmp_path / "out", precision="fp32,int8", validate_device="cpu", log=_quiet
        )
    assert "fp32" not in str(failure.value), "only the failing variant is named"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_default_variant_that_misses_its_gate_is_left_out_not_fatal(
    tiny_models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(validate_module.REQUIRED_COSINE, "int8", (0.97, 1.5))  # no export can reach this mean
    lines: list[str] = []
    remedy = r"the int8 variant is left out of this export: .* The CPU runs the fp32 variant instead"
    with pytest.warns(UserWarning, match=remedy):
        manifest = export_model(str(tiny_models["router"]), tmp_path / "out", validate_device="cpu", log=lines.append)
    assert list(manifest["variants"]) == ["fp16", "fp32"] and manifest["validation"]["passed"]
    assert manifest["variants"]["fp32"]["validation"]["passed"], "the added fp32 is validated like the others"
    assert manifest["cpu_fallback"] == "fp32 added because int8 missed its gate"
    assert "int8 missed its gate: adding fp32, so the CPU has a variant of its own" in lines
    assert "mean cosine" in manifest["dropped"]["int8"]["reason"]
    assert manifest["dropped"]["int8"]["validation"]["heads"]["anchor"]["mean_cosine"] < 1.5
    assert not (tmp_path / "out" / encoder_file("int8")).exists() and encoder_file("int8") not in manifest["files"]
    assert manifest["files"][encoder_file("fp32")]["sha256"] == sha256_file(tmp_path / "out" / encoder_file("fp32"))
    assert any(line.startswith("WARNING: the int8 variant is left out") for line in lines)
    assert Encoder.load(tmp_path / "out", device="cpu").precision == "fp32", "the CPU never falls to fp16"
    with pytest.raises(ManifestError, match=r"left it out because it missed its gate \(int8 head"):
        Encoder.load(tmp_path / "out", device="cpu", precision="int8")
    with pytest.raises(ExportValidationError, match=r"int8 head 'anchor': mean cosine"):
        export_model(str(tiny_models["router"]), tmp_path / "named", precision="fp16,int8", log=_quiet)
    assert not (tmp_path / "named").exists(), "named variants fail the export instead"


def test_fp16_on_the_cpu_warns_and_names_the_better_variant(tiny_exports: dict, tmp_path: Path) -> None:
    folder = tiny_exports[("router", "fp16")]
    with pytest.warns(RuntimeWarning, match=r"fp16 variant on the CPU.*load precision='int8' from this export"):
        assert Encoder.load(folder, device="cpu", precision="fp16").precision == "fp16", "a named variant runs"
    assert Encoder.load(folder, device="cpu").precision == "int8", "left to choose, the CPU never takes fp16"
    only = tmp_path / "only-fp16"
    shutil.copytree(folder, only)
    manifest = json.loads((only / "manifest.json").read_text())
    manifest["variants"] = {"fp16": manifest["variants"]["fp16"]}
    (only / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(RuntimeWarning, match=r"export the model again with the default precisions"):
        assert Encoder.load(only, device="cpu").precision == "fp16"


def test_unknown_precision_names_the_choices(tiny_models: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown precision int4; choose one or more of: fp16, fp32, int8"):
        export_model(str(tiny_models["router"]), tmp_path / "out", precision="fp16,int4", log=_quiet)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_pickled_weights_load_only_with_the_explicit_flag(
    tiny_models: dict, tiny_exports: dict, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    folder = _copy(tiny_models["router"], tmp_path)
    weights = [folder / "model.safetensors", *sorted((folder / "2_Router").glob("*/model.safetensors"))]
    assert len(weights) == 3
    for path in weights:
        torch.save(load_file(str(path)), path.with_name("pytorch_model.bin"))
        path.unlink()
    with pytest.raises(UnsupportedModelError, match="pickle"):
        export_model(str(folder), tmp_path / "refused", precision="fp32", log=_quiet)
    assert not (tmp_path / "refused").exists()

    manifest = export_model(str(folder), tmp_path / "out", precision="fp32", allow_pickle=True, log=_quiet)
    assert all(name.endswith("pytorch_model.bin") for name in manifest["source"]["weights_sha256"])
    texts = ["Software Engineer", "python, sql, docker"]
    pickled = Encoder.load(tmp_path / "out", device="cpu", precision="fp32")
    reference = Encoder.load(tiny_exports[("router", "fp32")], device="cpu", precision="fp32")
    for task in ("anchor", "positive"):
        np.testing.assert_array_equal(pickled.encode(texts, task=task), reference.encode(texts, task=task))


@pytest.mark.slow
def test_killed_export_never_leaves_something_that_loads(tiny_models: dict, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from jobbert_onnx.manifest import ManifestError

    out = tmp_path / "out"
    command = [sys.executable, "-m", "jobbert_onnx", "export", str(tiny_models["router"]), str(out)]
    command += ["--precision", "fp32", "--validate-device", "cpu"]
    kills = 0
    for delay in (1.5, 3.5, 5.5):  # while loading, exporting and validating
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if process.poll() is not None:
            break
        os.kill(process.pid, signal.SIGKILL)
        kills += 1
        process.wait()
        with pytest.raises(ManifestError):
            Encoder.load(out, device="cpu")
    assert kills >= 2, "the export finished before it could be killed twice"
    assert subprocess.run(command, capture_output=True).returncode == 0
    assert Encoder.load(out, device="cpu").encode("Koch").shape == (1024,)


@pytest.mark.parametrize("bias", [True, False])
def test_split_skip_layer_norm_computes_what_the_fused_node_does(bias: bool) -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from jobbert_onnx.export.graphs import split_skip_layer_norms

    rng = np.random.default_rng(0)
    names = ["x", "skip", "gamma", "beta", "bias"][: 5 if bias else 4]
    weights = [numpy_helper.from_array(rng.normal(size=8).astype(np.float32), n) for n in names[2:]]
    node = helper.make_node("SkipLayerNormalization", names, ["y"], domain="com.microsoft", epsilon=1e-5)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, 8]) for n in ("x", "skip")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])],
        weights,
    )
    fused = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    fused.ir_version = 8
    split = onnx.ModelProto()
    split.CopyFrom(fused)
    assert split_skip_layer_norms(split) == 1
    assert [n.op_type for n in split.graph.node] == ["Add", *(["Add"] if bias else []), "LayerNormalization"]
    feed = {
        "x": 30 * rng.normal(size=(2, 3, 8)).astype(np.float32),
        "skip": rng.normal(size=(2, 3, 8)).astype(np.float32),
    }
    run = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        for m in (fused, split)
    ]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-5)


def test_fp16_made_from_a_cpu_variant_gets_its_fused_norms_back(tiny_exports: dict, tmp_path: Path) -> None:
    """Benchmarks derive fp16 encoders from the fp32 one, whose SkipLayerNormalization nodes are split for the CPU."""
    import onnxruntime as ort

    from jobbert_onnx.export.graphs import write_variant

    fp32 = tiny_exports[("router", "fp32")] / encoder_file("fp32")
    out = tmp_path / "fp16.onnx"
    write_variant(fp32, out, "fp16", "2d")
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert ops.count("SkipLayerNormalization") == 2 * TINY_LAYERS and ops.count("LayerNormalization") == 1
    ids = np.array([[0, 2041, 4567, 87, 2], [0, 35, 3293, 2, 1]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}
    got, want = (
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0] for path in (out, fp32)
    )
    real = feed["attention_mask"] == 1
    np.testing.assert_allclose(got[real], want[real], atol=2e-2)
