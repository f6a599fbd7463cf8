"""One graph per batch: the encoder, mean pooling and every head of one variant, merged.

The runtime chains the graphs with IO binding (three runs per batch); on CUDA each
run costs a launch of its own and a synchronization, which a merged graph pays once.
`export --merged` writes it beside the chain's files, and `Tuning.merged` (on by
default on CUDA where the export has it) runs it. The chain's files stay: the CPU
variants, the placement probe and the per-stage profile use them.

The graph reads ``input_ids`` and ``attention_mask`` and writes one output per head
(`manifest.merged_output`), so a run binds only the head it was asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from jobbert_onnx.manifest import (
    ATTENTION_MASK,
    EMBEDDING,
    POOLING_FILE,
    SENTENCE_EMBEDDING,
    TOKEN_EMBEDDINGS,
    head_file,
    merged_output,
)


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


def merge(folder: Path, encoder: str, routes: tuple[str, ...]) -> onnx.ModelProto:
    """input_ids, attention_mask -> one output per route, from the graphs in `folder`."""
    model = onnx.load(str(folder / encoder))
    nodes, inits = list(model.graph.node), list(model.graph.initializer)
    shared = {n: n for n in (TOKEN_EMBEDDINGS, ATTENTION_MASK, SENTENCE_EMBEDDING)}
    pooling = onnx.load(str(folder / POOLING_FILE))
    more_nodes, more_inits = _renamed(pooling, "pooling/", shared)
    nodes += more_nodes
    inits += more_inits
    outputs, heads = [], []
    for route in routes:
        head = onnx.load(str(folder / head_file(route)))
        heads.append(head)
        keep = {SENTENCE_EMBEDDING: SENTENCE_EMBEDDING, EMBEDDING: merged_output(route)}
        more_nodes, more_inits = _renamed(head, f"{route}/", keep)
        nodes += more_nodes
        inits += more_inits
        output = onnx.ValueInfoProto()
        output.CopyFrom(head.graph.output[0])
        output.name = merged_output(route)
        outputs.append(output)
    graph = helper.make_graph(nodes, "jobbert_v3", list(model.graph.input), outputs, inits)
    versions: dict[str, int] = {}
    for opset in (*model.opset_import, *pooling.opset_import, *(o for h in heads for o in h.opset_import)):
        versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    opsets = [helper.make_opsetid(domain, version) for domain, version in versions.items()]
    return helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)


def write_merged(folder: Path, encoder: str, routes: tuple[str, ...], out: Path) -> dict[str, Any]:
    """Write the merged graph of `encoder` (a file in `folder`) to `out`; its facts for the manifest."""
    merged = merge(folder, encoder, routes)
    onnx.save(merged, str(out))
    return {"nodes": len(merged.graph.node), "outputs": [o.name for o in merged.graph.output]}
