"""One merged graph per export variant: encoder + pooling + both heads in a single session.

The runtime chains four sessions with IO binding; this builds the alternative
from the same files (it needs the `onnx` package, which the runtime does not
depend on) so the benchmark can measure both in the same run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from jobbert_onnx.manifest import EMBEDDING, POOLING_FILE, TOKENIZER_FILE, head_file, read_manifest
from jobbert_onnx.runtime.batching import plan_batches
from jobbert_onnx.runtime.sessions import Device, parse_device, session_options
from jobbert_onnx.runtime.tokenize import TextTokenizer


def _renamed(model: onnx.ModelProto, prefix: str, keep: dict[str, str]) -> tuple[list, list]:
    """Nodes and initializers of `model` with every name prefixed, except those in `keep` (mapped)."""

    def name(value: str) -> str:
        return keep.get(value, value if value == "" else prefix + value)

    nodes, inits = [], []
    for index, node in enumerate(model.graph.node):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{prefix}{node.name or index}"
        del copy.input[:]
        copy.input.extend(name(i) for i in node.input)
        del copy.output[:]
        copy.output.extend(name(o) for o in node.output)
        nodes.append(copy)
    for tensor in model.graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name = name(tensor.name)
        inits.append(copy)
    return nodes, inits


def merge(folder: Path, precision: str) -> onnx.ModelProto:
    """input_ids, attention_mask -> embedding_<route> for every route, in one graph."""
    manifest = read_manifest(folder)
    encoder = onnx.load(str(folder / manifest.variants[precision].file))
    nodes, inits = list(encoder.graph.node), list(encoder.graph.initializer)
    shared = {n: n for n in ("token_embeddings", "attention_mask", "sentence_embedding")}
    more_nodes, more_inits = _renamed(onnx.load(str(folder / POOLING_FILE)), "pooling/", shared)
    nodes += more_nodes
    inits += more_inits
    outputs = []
    for route in manifest.routes:
        head = onnx.load(str(folder / head_file(route)))
        keep = {"sentence_embedding": "sentence_embedding", EMBEDDING: f"{EMBEDDING}_{route}"}
        more_nodes, more_inits = _renamed(head, f"{route}/", keep)
        nodes += more_nodes
        inits += more_inits
        output = onnx.ValueInfoProto()
        output.CopyFrom(head.graph.output[0])
        output.name = f"{EMBEDDING}_{route}"
        outputs.append(output)
    graph = helper.make_graph(nodes, "jobbert_v3", list(encoder.graph.input), outputs, inits)
    return helper.make_model(graph, opset_imports=list(encoder.opset_import), ir_version=encoder.ir_version)


class MergedEncoder:
    """Encode with the merged graph, batching exactly as the runtime does on the CPU."""

    def __init__(self, folder: Path, precision: str, device: str = "cpu") -> None:
        manifest = read_manifest(folder)
        kind, index = parse_device(device)
        providers = Device("cuda" if kind == "cuda" else "cpu", index).providers()
        model = merge(folder, precision).SerializeToString()
        self.session = ort.InferenceSession(model, session_options(), providers=providers)
        self.provider = self.session.get_providers()[0]
        self.tokenizer = TextTokenizer(manifest.path(TOKENIZER_FILE), manifest.max_seq_length)
        self.dim = manifest.output_dim

    def encode(self, texts: list[str], task: str, batch_size: int) -> np.ndarray:
        tokenized = self.tokenizer.tokenize(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for plan in plan_batches(tokenized.lengths, batch_size):
            batch = self.tokenizer.pad(tokenized, plan.rows)
            feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            out[plan.rows] = self.session.run([f"{EMBEDDING}_{task}"], feeds)[0]
        return out
