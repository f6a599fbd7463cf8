"""Small edits of ONNX graphs shared by the exporter's passes."""

from __future__ import annotations

import onnx


def topological_sort(graph: onnx.GraphProto) -> None:
    """Order nodes so every input is produced before it is read (appended nodes come last otherwise)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        still = [node for node in pending if not all(name in ready for name in node.input)]
        done = [node for node in pending if all(name in ready for name in node.input)]
        if not done:
            stuck = still[0].name or still[0].op_type
            raise ValueError(f"the encoder graph has a cycle or an unknown input at {stuck}")
        for node in done:
            ordered.append(node)
            ready.update(node.output)
        pending = still
    del graph.node[:]
    graph.node.extend(ordered)
