"""int4 weight-only encoders (onnxruntime's MatMulNBits) against the export's int8, on the CPU.

Usage: python -m benchmarks.int4 EXPORT [--candidates 16:4,32:4,128:4,32:0] [--texts 512] --out DIR

Each candidate is built from the export's fp32 encoder (the fused graph):

- the fused Attention nodes are split back into a QKV MatMul, a Split and
  onnxruntime's MultiHeadAttention (MatMulNBits replaces MatMul nodes only, and
  the fused Attention holds the QKV weights inside itself);
- every weight MatMul becomes MatMulNBits: 4-bit symmetric blocks along the input
  axis, each block's scale chosen among 21 shrinkages of its largest value by the
  least squared error (plain round-to-nearest loses more), and the activations
  quantized to int8 per block at run time (``accuracy_level`` 4) or kept fp32 (0);
- the word-embedding table in int8 with a scale per row, as in the int8 variant.

Every candidate runs through the runtime (tokenizer, encoder, pooling, head)
from a scratch copy of the export that holds it in place of the int8 encoder,
and is measured in the same run as the export's int8: cosine to the export's
fp32 vectors (itself within 1e-5 of PyTorch at export), batch-1 latency string in
to vector out and batch-32 throughput (the contenders interleaved round by round),
the encoder file's size, and the share of batch-1 time per op type (onnxruntime's
profiler).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from benchmarks import workloads
from benchmarks.gpu_probe import cpu_name
from jobbert_onnx import Encoder, Tuning
from jobbert_onnx.export.graph_edit import topological_sort
from jobbert_onnx.export.quantize import row_wise_embeddings
from jobbert_onnx.manifest import MANIFEST_NAME, TOKENIZER_FILE, encoder_file, read_manifest
from jobbert_onnx.vectors import row_cosines

SHRINKS = np.linspace(0.5, 1.0, 21)


def quantize_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] fp32 -> MatMulNBits' packed 4-bit blocks [N, K/block, block/2] and scales [N * K/block].

    Symmetric: a value is ``(q - 8) * scale`` with q in 0..15 (MatMulNBits' default zero point).
    """
    k, n = weight.shape
    blocks_per_column = -(-k // block)
    columns = np.pad(weight.T, ((0, 0), (0, blocks_per_column * block - k))).reshape(n, blocks_per_column, block)
    largest = np.take_along_axis(columns, np.abs(columns).argmax(-1)[..., None], -1) / -8.0
    largest[largest == 0] = 1.0
    best_error = np.full(largest.shape, np.inf, dtype=np.float32)
    scale = largest.copy()
    for shrink in SHRINKS:
        trial = largest * shrink
        error = ((np.clip(np.round(columns / trial), -8, 7) * trial - columns) ** 2).sum(-1, keepdims=True)
        better = error < best_error
        best_error, scale = np.where(better, error, best_error), np.where(better, trial, scale)
    levels = (np.clip(np.round(columns / scale), -8, 7) + 8).astype(np.uint8)
    packed = (levels[..., 0::2] | (levels[..., 1::2] << 4)).astype(np.uint8)
    return packed, scale.reshape(-1).astype(np.float32)


def _split_attention(model: onnx.ModelProto) -> None:
    """Attention(x, Wqkv, b, mask) -> MultiHeadAttention(Split(MatMul(x, Wqkv)), b, mask), in place."""
    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    for node in [node for node in graph.node if node.op_type == "Attention"]:
        heads = next(attribute.i for attribute in node.attribute if attribute.name == "num_heads")
        x, weight, bias, mask = node.input[:4]
        name = node.name or node.output[0]
        hidden = weights[weight].dims[1] // 3
        graph.node.remove(node)
        graph.initializer.append(numpy_helper.from_array(np.array([hidden] * 3, dtype=np.int64), f"{name}_split"))
        graph.node.extend(
            [
                helper.make_node("MatMul", [x, weight], [f"{name}_qkv"], name=f"{name}_qkv"),
                helper.make_node("Split", [f"{name}_qkv", f"{name}_split"], [f"{name}_{p}" for p in "qkv"], axis=-1),
                helper.make_node(
                    "MultiHeadAttention",
                    [f"{name}_q", f"{name}_k", f"{name}_v", bias, mask],
                    list(node.output),
                    name=f"{name}_mha",
                    domain="com.microsoft",
                    num_heads=heads,
                ),
            ]
        )


def _to_nbits(model: onnx.ModelProto, block: int, accuracy_level: int) -> None:
    """Every MatMul with a 2-D weight initializer -> MatMulNBits, in place."""
    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in weights or len(weights[node.input[1]].dims) != 2:
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        packed, scales = quantize_blocks(weight, block)
        name = node.input[1]
        graph.initializer.extend(
            [numpy_helper.from_array(packed, f"{name}_q4"), numpy_helper.from_array(scales, f"{name}_q4_scales")]
        )
        graph.node[index].CopyFrom(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], f"{name}_q4", f"{name}_q4_scales"],
                list(node.output),
                name=f"{node.name or name}_q4",
                domain="com.microsoft",
                K=weight.shape[0],
                N=weight.shape[1],
                bits=4,
                block_size=block,
                accuracy_level=accuracy_level,
            )
        )
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def write_int4(fp32: Path, out: Path, block: int, accuracy_level: int) -> None:
    """An int4 weight-only encoder from the fused fp32 encoder."""
    model = onnx.load(str(fp32))
    _split_attention(model)
    _to_nbits(model, block, accuracy_level)
    row_wise_embeddings(model)
    topological_sort(model.graph)
    onnx.save(model, str(out))


def _candidate_export(export: Path, encoder: Path, scratch: Path, label: str) -> Path:
    """A scratch copy of `export` that serves `encoder` as its int8 variant (not validated at export)."""
    manifest = read_manifest(export)
    out = scratch / label
    out.mkdir()
    for name in manifest.files:
        if not name.startswith("encoder."):
            os.symlink((export / name).resolve(), out / name)
    os.symlink(encoder.resolve(), out / encoder_file("int8"))
    raw = dict(manifest.raw)
    raw["files"] = {
        **{name: facts for name, facts in raw["files"].items() if not name.startswith("encoder.")},
        encoder_file("int8"): {"sha256": None, "size": encoder.stat().st_size},
    }
    raw["variants"] = {"int8": {**raw["variants"]["int8"], "validation": {"note": f"benchmark candidate {label}"}}}
    (out / MANIFEST_NAME).write_text(json.dumps(raw))
    return out


def _profile_share(encoder: Path, ids: np.ndarray) -> dict[str, float]:
    """Share of the encoder's batch-1 kernel time per op type."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(encoder.parent / "profile")
    session = ort.InferenceSession(str(encoder), options, providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for _ in range(30):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    spent: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"]
    total = sum(spent.values())
    return {op: round(time_ / total, 3) for op, time_ in spent.most_common(6)}


def _quality(encoder: Encoder, titles: list[str], skills: list[str], want: dict[str, np.ndarray]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for task, texts in (("anchor", titles), ("positive", skills)):
        cosines = row_cosines(encoder.encode(texts, task=task), want[task])
        figures[task] = {
            "mean_cosine": float(cosines.mean()),
            "min_cosine": float(cosines.min()),
            "below_0.98": int((cosines < 0.98).sum()),
        }
    return figures


def _load(folder: Path) -> Encoder:
    return Encoder.load(folder, device="cpu", precision="int8", verify=False, tuning=Tuning(dedup=False))


def _speed(folders: dict[str, Path], titles: list[str], rounds: int) -> dict[str, dict[str, float]]:
    """Batch-1 p50 and batch-32 titles/s, the contenders interleaved round by round so drift hits all alike.

    One encoder is loaded at a time: an idle session's thread pool keeps spinning for a
    while after each run, and several of them on two cores slow each other down.
    """
    latencies: dict[str, list[float]] = {label: [] for label in folders}
    throughput: dict[str, list[float]] = {label: [] for label in folders}
    for round_ in range(rounds):
        for label, folder in folders.items():
            encoder = _load(folder)
            for text in titles[:20]:
                encoder.encode([text], task="anchor")
            for text in titles[round_ * 100 : (round_ + 1) * 100]:
                start = time.perf_counter()
                encoder.encode([text], task="anchor")
                latencies[label].append(time.perf_counter() - start)
            start = time.perf_counter()
            encoder.encode(titles, task="anchor", batch_size=32)
            throughput[label].append(len(titles) / (time.perf_counter() - start))
            del encoder
    return {
        label: {
            "batch1_p50_ms": statistics.median(latencies[label]) * 1e3,
            "batch32_titles_per_s": statistics.median(throughput[label]),
        }
        for label in folders
    }


def run(export: Path, candidates: list[tuple[int, int]], texts: int, rounds: int) -> dict[str, Any]:
    manifest = read_manifest(export)
    missing = {"fp32", "int8"} - set(manifest.variants)
    if missing:
        raise SystemExit(f"{export} lacks {sorted(missing)}: export with --precision fp32,int8 (or fp16,fp32,int8)")
    titles = workloads.titles(texts)
    skills = workloads.skill_lists(texts // 4, export / TOKENIZER_FILE)
    reference = Encoder.load(export, device="cpu", precision="fp32", tuning=Tuning(dedup=False))
    want = {"anchor": reference.encode(titles, task="anchor"), "positive": reference.encode(skills, task="positive")}
    probe = np.array([reference.tokenizer.tokenize([titles[0]]).ids[0]])
    del reference
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="jobbert-onnx-int4-", dir=export.parent) as tmp:
        scratch = Path(tmp)
        graphs = {"int8": export / encoder_file("int8")}
        for block, level in candidates:
            label = f"int4-b{block}-acc{level}"
            graphs[label] = scratch / f"{label}.onnx"
            write_int4(export / encoder_file("fp32"), graphs[label], block, level)
        folders = {label: _candidate_export(export, graph, scratch, label) for label, graph in graphs.items()}
        for label, graph in graphs.items():
            results[label] = {
                **_quality(_load(folders[label]), titles, skills, want),
                "file_mb": graph.stat().st_size / 1e6,
                "batch1_profile": _profile_share(graph, probe),
            }
            print(label, json.dumps(results[label]), flush=True)
        for label, speed in _speed(folders, titles, rounds).items():
            results[label].update(speed)
            print(label, json.dumps(speed), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int4", description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="an export with fp32 and int8 encoders")
    parser.add_argument(
        "--candidates",
        default="16:4,32:4,128:4,32:0",
        help="BLOCK:LEVEL pairs: 4-bit block size and MatMulNBits accuracy level (4: int8 compute, 0: fp32)",
    )
    parser.add_argument("--texts", type=int, default=512, help="titles measured (a quarter as many skill lists)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (100 single titles each)")
    parser.add_argument("--out", type=Path, required=True, help="folder for int4.json")
    args = parser.parse_args(argv)
    import onnxruntime

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    candidates = [(int(block), int(level)) for block, level in (pair.split(":") for pair in args.candidates.split(","))]
    results = run(args.export.resolve(), candidates, args.texts, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python -m benchmarks.int4 " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": started,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "export": str(args.export),
        "model": read_manifest(args.export).raw["source"]["model"],
        "results": results,
    }
    (args.out / "int4.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
