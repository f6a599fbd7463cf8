"""Where int8's error comes from: each quantization choice measured alone, against PyTorch fp32.

Usage: python -m benchmarks.int8_choices MODEL [--scale 2] [--peer-venv .bench/peer-venv]
       [--titles 512] [--skill-lists 128] --out DIR

Exports MODEL's fp32 encoder under DIR (with ``--scale F``, a copy of MODEL whose
encoder matrices, attention and feed-forward, are F times larger first: a harder
replica than the Gaussian init), then builds int8 encoders from it that differ in one
choice each, and runs every one through the export's pooling and heads on real titles
(anchor) and skill lists (positive):

- shipped: what the exporter writes (smoothing chosen by measurement, word-embedding
  table int8 with one scale per row, every product and the fused Attention in int8);
- no smoothing: the same without scale migration;
- embeddings fp32: products int8, the table left in fp32;
- embeddings as onnxruntime's quantizer does them (the Gather quantized, one scale for
  the whole table), what plain dynamic int8 gives;
- Attention fp32: the fused QKV projection and attention left in fp32, the other
  products int8;
- embeddings only: the row-wise int8 table, every product fp32;
- the peer: sentence-transformers' ONNX int8 encoder of the same weights, made in the
  peers' environment (``--peer-venv``, as ``python -m benchmarks`` builds it), through
  the same pooling and heads.

Only the non-shipped variants skip smoothing; where the model has no outlier inputs the
shipped one has none either (the manifest's "inputs": 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import workloads
from benchmarks.__main__ import _slug
from benchmarks.gpu_probe import cpu_name
from jobbert_onnx import samples
from jobbert_onnx.manifest import encoder_file
from jobbert_onnx.vectors import row_cosines

BATCH = 32


def scaled_copy(model: Path, factor: float, out: Path) -> Path:
    """A copy of `model` whose encoder attention and feed-forward matrices are `factor` times larger."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(model, out)
    weights = load_file(str(model / "model.safetensors"))
    scaled = 0
    for name, value in weights.items():
        if name.startswith("encoder.layer.") and name.endswith(".weight") and value.ndim == 2:
            weights[name] = value * np.float32(factor)
            scaled += 1
    if not scaled:
        raise SystemExit(f"{model} has no encoder.layer.* matrices to scale")
    save_file(weights, str(out / "model.safetensors"))
    return out


def _variants(fp32: Path, tokenizer: Path, work: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    import onnx

    from jobbert_onnx.export.graph_edit import topological_sort
    from jobbert_onnx.export.quantize import Calibration, quantize_products, row_wise_embeddings, write_int8

    calibration = Calibration(tokenizer, samples.calibration_sample())
    built: dict[str, tuple[Path, dict[str, Any]]] = {}

    def staged(name: str, rows: bool, quantize: Callable[[Path, Path], None] | None) -> None:
        out = work / f"{_slug(name)}.onnx"
        if not rows:
            assert quantize is not None, "a variant changes the table or the products"
            quantize(fp32, out)
        else:
            model = onnx.load(str(fp32))
            row_wise_embeddings(model)
            topological_sort(model.graph)
            source = work / f"{_slug(name)}.staged.onnx"
            onnx.save(model, str(source), save_as_external_data=not quantize, location=f"{_slug(name)}.data")
            del model
            if quantize:
                quantize(source, out)
                source.unlink()
            else:
                source.rename(out)
        built[name] = (out, {})

    out = work / "shipped.onnx"
    built["shipped"] = (out, write_int8(fp32, out, calibration))
    out = work / "no-smoothing.onnx"
    built["no smoothing"] = (out, write_int8(fp32, out, calibration, alphas=()))
    staged("embeddings fp32", rows=False, quantize=quantize_products)
    staged(
        "embeddings with one scale (onnxruntime's quantizer)",
        rows=False,
        quantize=lambda source, out: quantize_products(source, out, ("MatMul", "Attention", "Gather")),
    )
    staged("Attention fp32", rows=True, quantize=lambda source, out: quantize_products(source, out, ("MatMul",)))
    staged("only the embeddings int8", rows=True, quantize=None)
    return built


def _vectors(encoder: Path, export: Path, texts: list[str], head: str) -> np.ndarray:
    """Vectors of `texts` through `encoder`, then the export's mean pooling and `head`."""
    import onnxruntime as ort

    from jobbert_onnx.export.quantize import Calibration

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(encoder), options, providers=["CPUExecutionProvider"])
    heads = ort.InferenceSession(str(export / f"head_{head}.onnx"), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    out = []
    for input_ids, mask in Calibration(export / "tokenizer.json", texts).batches(BATCH):
        feed = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
        tokens = session.run(None, {k: v for k, v in feed.items() if k in wanted})[0]
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        out.append(heads.run(None, {heads.get_inputs()[0].name: pooled.astype(np.float32)})[0])
    return np.concatenate(out)


def _peer_int8(model: Path, venv: Path, work: Path) -> Path:
    """sentence-transformers' ONNX int8 encoder of `model`, made with its own export functions."""
    import subprocess

    from benchmarks import peers

    target = work / "st-onnx"
    shutil.copytree(model, target)
    preset = peers.quantization_config()
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [str(peers.python_of(venv)), "-m", "benchmarks.prepare_st_onnx", str(target), preset],
        check=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    return target / "onnx" / f"model_qint8_{preset}.onnx"


def run(model: Path, work: Path, peer_venv: Path | None, count: int, lists: int) -> dict[str, Any]:
    from jobbert_onnx.export import export_model
    from jobbert_onnx.export.reference import TorchReference
    from jobbert_onnx.export.source import read_model

    export = work / "export"
    export_model(str(model), export, precision="fp32", validate_device="cpu", log=lambda _: None)
    texts = {"titles": workloads.titles(count), "skill_lists": workloads.skill_lists(lists, export / "tokenizer.json")}
    heads = {"titles": "anchor", "skill_lists": "positive"}
    reference = TorchReference(read_model(str(model)))
    want = {kind: reference.encode(texts[kind], heads[kind]) for kind in texts}
    del reference
    variants = _variants(export / encoder_file("fp32"), export / "tokenizer.json", work)
    if peer_venv:
        variants["sentence-transformers ONNX int8 (peer)"] = (_peer_int8(model, peer_venv, work), {})
    results: dict[str, Any] = {}
    for name, (encoder, applied) in variants.items():
        figures: dict[str, Any] = {}
        for kind in texts:
            cosines = row_cosines(_vectors(encoder, export, texts[kind], heads[kind]), want[kind])
            figures[kind] = {"mean": float(cosines.mean()), "min": float(cosines.min())}
        if applied:
            figures["applied"] = applied
        results[name] = figures
        print(name, {k: v for k, v in figures.items() if k != "applied"}, file=sys.stderr)
    return {"texts": {kind: len(texts[kind]) for kind in texts}, "variants": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_choices", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a sentence-transformers folder")
    parser.add_argument("--scale", type=float, help="measure a copy whose encoder matrices are this many times larger")
    parser.add_argument("--peer-venv", type=Path, help="the peers' environment, to measure their int8 alongside")
    parser.add_argument("--titles", type=int, default=512)
    parser.add_argument("--skill-lists", type=int, default=128)
    parser.add_argument("--out", type=Path, required=True, help="folder for choices.json")
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jobbert-onnx-int8-choices-") as scratch:
        work = Path(scratch)
        model = scaled_copy(args.model, args.scale, work / "model") if args.scale else args.model
        summary = run(model, work, args.peer_venv, args.titles, args.skill_lists)
    record = {
        "command": "python -m benchmarks.int8_choices " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": started,
        "cpu": cpu_name(),
        "scale": args.scale,
        **summary,
    }
    (args.out / "choices.json").write_text(json.dumps(record, indent=2) + "\n")
    for name, figures in summary["variants"].items():
        print(
            f"| {name} | {figures['titles']['mean']:.7f} / {figures['titles']['min']:.7f}"
            f" | {figures['skill_lists']['mean']:.7f} / {figures['skill_lists']['min']:.7f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
