"""The fp16 encoder without padding inside (`export --packed`), for CUDA.

onnxruntime's packing conversion puts a RemovePadding node before the first
Attention (the real tokens of the batch, end to end), PackedAttention nodes in
place of Attention, and a RestorePadding node after the last layer norm: the
layers compute on real tokens only, the output has the usual [batch, seq, hidden]
shape with zeros at padded positions. It reads the key lengths, so it starts from
the fp16 encoder with the ``lengths`` mask form.

RemovePadding, PackedAttention and RestorePadding have CUDA kernels only: the
export validates the graph where it validates on CUDA, and records that it did
not where it validates on the CPU; the runtime refuses it on the CPU
(`Tuning.packed`). The GPU proof measures it against the padded graph.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from jobbert_onnx.export.graphs import write_variant

# What the conversion must leave, for the graph to be the packed form.
PACKED_NODES = ("RemovePadding", "PackedAttention", "RestorePadding")


def write_packed(fused: Path, out: Path) -> dict[str, Any]:
    """Write the packed fp16 encoder of the fused fp32 graph `fused`; its node counts for the manifest."""
    from onnxruntime.transformers.convert_to_packing_mode import PackingMode
    from onnxruntime.transformers.onnx_model import OnnxModel

    with tempfile.TemporaryDirectory(prefix=".packed-", dir=out.parent) as folder:
        padded = Path(folder) / "encoder.fp16.lengths.onnx"
        write_variant(fused, padded, "fp16", "lengths")
        model = OnnxModel(onnx.load(str(padded)))
    PackingMode(model).convert(use_symbolic_shape_infer=True)
    model.topological_sort()
    counts = Counter(node.op_type for node in model.model.graph.node)
    missing = [op for op in PACKED_NODES if not counts[op]]
    if missing or counts["Attention"]:
        raise RuntimeError(
            f"onnxruntime's packing conversion left {dict(counts)} (missing {missing}, "
            f"{counts['Attention']} Attention nodes unconverted): this onnxruntime cannot pack this encoder"
        )
    onnx.save(model.model, str(out))
    return {"nodes": {op: counts[op] for op in PACKED_NODES}}
