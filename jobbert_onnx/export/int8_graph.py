"""The int8 encoder's graph: every matrix product in int8 with one activation scale per token.

Why per token. onnxruntime's dynamic quantization gives an activation tensor one
scale per batch: a text's int8 vector then depends on what it is batched with (its
neighbours' largest values, and padded positions, which in trained encoders reach
several times the real tokens' range), and a single outlier token (trained encoders'
first token) coarsens every other token's levels. Here each token's row is quantized
with its own scale, ``max|x_row| / levels``: a token's int8 inputs depend on that token
alone, so a text's vector does not depend on its batch, and one token's outliers cost
only that token.

Why the weights keep 7 bits. onnxruntime's int8 matrix kernel multiplies unsigned 8-bit
activations by signed 8-bit weights. On x86 CPUs without VNNI (AVX2 only, e.g. AMD
Zen 3), that instruction (``vpmaddubsw``) adds pairs of products into 16 bits and
saturates: with both operands at full range the results are silently wrong (errors of
11.6% of the output's range, measured on an AMD EPYC with AVX2). Weights in [-63, 63]
keep every pair below 2^15 on every CPU; with one scale per output column they lose
less than the activations would (benchmarks/RESULTS.md measures both).

The encoder layers run on [tokens, hidden] rows (`flatten_tokens`), and each product
``x @ W`` (x: [tokens, K], W: a [K, N] initializer) becomes::

    s = ReduceMax(|x|, axis 1) / 127                                    # [tokens]
    q = QuantizeLinear(x, s, 128, axis=0)                               # uint8 [tokens, K]
    y = MatMulIntegerToFloat(q, Wq, 1, w_scale, 128, 0) * s[:, None]     # [tokens, N]

Each fused Attention becomes that product for its packed QKV weight, a Split, and
MultiHeadAttention on the three (fp32, as onnxruntime's QAttention computes it too).
The word-embedding table is stored in int8 with one scale per row (token).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jobbert_onnx.export.embedding_table import detached_table, table_blocks
from jobbert_onnx.export.graph_edit import topological_sort

# Weight levels: [-63, 63] keeps u8 x s8 pair sums below 2^15 (see the module docstring).
WEIGHT_LEVELS = 63
# Activation levels: symmetric around the zero point 128, so [1, 255].
ACTIVATION_LEVELS = 127
_ZERO_POINT = 128
_MS_DOMAIN = "com.microsoft"


def split_attention(model: onnx.ModelProto) -> int:
    """Attention(x, Wqkv, b, mask) -> MultiHeadAttention(Split(MatMul(x, Wqkv)), b, mask), in place.

    Returns how many Attention nodes were split.
    """
    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    split = 0
    for node in graph.node:
        if node.op_type != "Attention":
            nodes.append(node)
            continue
        heads = next(attribute.i for attribute in node.attribute if attribute.name == "num_heads")
        x, weight, bias, mask = node.input[:4]
        name = node.name or node.output[0]
        hidden = weights[weight].dims[1] // 3
        graph.initializer.append(numpy_helper.from_array(np.array([hidden] * 3, dtype=np.int64), f"{name}_split"))
        nodes += [
            helper.make_node("MatMul", [x, weight], [f"{name}_qkv"], name=f"{name}_qkv"),
            helper.make_node("Split", [f"{name}_qkv", f"{name}_split"], [f"{name}_{p}" for p in "qkv"], axis=-1),
            helper.make_node(
                "MultiHeadAttention",
                [f"{name}_q", f"{name}_k", f"{name}_v", bias, mask],
                list(node.output),
                name=f"{name}_mha",
                domain=_MS_DOMAIN,
                num_heads=heads,
            ),
        ]
        split += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return split


def quantize_weight(weight: np.ndarray, levels: int = WEIGHT_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per output column: (int8 [K, N], float32 scales [N])."""
    scale = (np.maximum(np.abs(weight).max(0), 1e-12) / levels).astype(np.float32)
    quantized = np.clip(np.round(weight / scale), -levels, levels).astype(np.int8)
    return quantized, scale


def flatten_tokens(model: onnx.ModelProto) -> None:
    """Run the encoder layers on [tokens, hidden] instead of [batch, sequence, hidden], in place.

    Every matrix product, LayerNormalization, residual Add and GELU reads the last axis
    alone, so the token rows can stay one 2-D matrix from the embeddings' LayerNorm to the
    output; only MultiHeadAttention takes [batch, sequence, hidden], and its inputs and
    output are reshaped around it. Per-token quantization then needs no reshapes of its
    own (six fewer nodes per product, which count at batch 1). Call after `split_attention`.
    """
    graph = model.graph
    norms = [node for node in graph.node if node.op_type == "LayerNormalization"]
    attention = [node for node in graph.node if node.op_type == "MultiHeadAttention"]
    if not norms or not attention:
        raise ValueError("flatten_tokens needs the split encoder: LayerNormalization and MultiHeadAttention nodes")
    weights = {tensor.name: tensor for tensor in graph.initializer}
    hidden = int(numpy_helper.to_array(weights[norms[0].input[1]]).shape[-1])
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([-1, hidden], dtype=np.int64), "tokens_2d"),
            numpy_helper.from_array(np.array([hidden], dtype=np.int64), "tokens_hidden"),
        ]
    )
    nodes = [
        helper.make_node("Shape", [graph.input[0].name], ["tokens_batch_sequence"]),
        helper.make_node("Concat", ["tokens_batch_sequence", "tokens_hidden"], ["tokens_3d"], axis=0),
    ]
    renamed: dict[str, str] = {}
    output = graph.output[0].name
    embedded = norms[0].output[0]
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        if node.op_type == "MultiHeadAttention":
            for index in range(3):
                nodes.append(helper.make_node("Reshape", [node.input[index], "tokens_3d"], [f"{node.name}_in{index}"]))
                node.input[index] = f"{node.name}_in{index}"
        nodes.append(node)
        if node.output[0] == output:
            node.output[0] = f"{output}_rows"
            nodes.append(helper.make_node("Reshape", [f"{output}_rows", "tokens_3d"], [output]))
        elif node.output[0] == embedded or node.op_type == "MultiHeadAttention":
            renamed[node.output[0]] = f"{node.output[0]}_rows"
            nodes.append(helper.make_node("Reshape", [node.output[0], "tokens_2d"], [f"{node.output[0]}_rows"]))
    del graph.node[:]
    graph.node.extend(nodes)
    topological_sort(graph)


def per_token_products(model: onnx.ModelProto, levels: int = WEIGHT_LEVELS) -> int:
    """Every MatMul with a 2-D weight initializer -> int8 with per-token activation scales, in place.

    The products' inputs must be [tokens, K] (`flatten_tokens`). Returns how many products
    were quantized.
    """
    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1], dtype=np.int64), "q8_axis1"),
            numpy_helper.from_array(np.array(1 / ACTIVATION_LEVELS, dtype=np.float32), "q8_step"),
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "q8_one"),
            numpy_helper.from_array(np.array(_ZERO_POINT, dtype=np.uint8), "q8_zero_point"),
        ]
    )
    nodes: list[onnx.NodeProto] = []
    done = 0
    for node in graph.node:
        tensor = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if tensor is None or len(tensor.dims) != 2:
            nodes.append(node)
            continue
        quantized, scale = quantize_weight(numpy_helper.to_array(tensor), levels)
        p = f"q8_{done}"
        graph.initializer.extend(
            [
                numpy_helper.from_array(quantized, f"{p}_weight"),
                numpy_helper.from_array(scale, f"{p}_weight_scale"),
                numpy_helper.from_array(np.zeros(quantized.shape[1], dtype=np.int8), f"{p}_weight_zero"),
            ]
        )
        if done == 0:
            # The zero point of every token row; all products see the same rows.
            nodes += [
                helper.make_node("Shape", [node.input[0]], ["q8_shape"], end=1),
                helper.make_node("Expand", ["q8_zero_point", "q8_shape"], ["q8_row_zero"]),
            ]
        # A row of zeros gets scale 0: its int8 values are meaningless, and multiplied by 0.
        nodes += [
            helper.make_node("Abs", [node.input[0]], [f"{p}_abs"]),
            helper.make_node("ReduceMax", [f"{p}_abs"], [f"{p}_peak"], axes=[1], keepdims=0),
            helper.make_node("Mul", [f"{p}_peak", "q8_step"], [f"{p}_scale"]),
            helper.make_node("QuantizeLinear", [node.input[0], f"{p}_scale", "q8_row_zero"], [f"{p}_q"], axis=0),
            helper.make_node(
                "MatMulIntegerToFloat",
                [f"{p}_q", f"{p}_weight", "q8_one", f"{p}_weight_scale", "q8_zero_point", f"{p}_weight_zero"],
                [f"{p}_unscaled"],
                domain=_MS_DOMAIN,
            ),
            helper.make_node("Unsqueeze", [f"{p}_scale", "q8_axis1"], [f"{p}_row_scale"]),
            helper.make_node("Mul", [f"{p}_unscaled", f"{p}_row_scale"], list(node.output)),
        ]
        done += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(opset.domain == _MS_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS_DOMAIN, 1))
    topological_sort(graph)
    return done


def row_wise_embeddings(model: onnx.ModelProto, folder: Path | None = None) -> int:
    """Store the word-embedding table as int8 with a scale per row, in place; returns its rows (0: none found).

    A table detached into `folder` (`embedding_table`) is read from there, a block of rows at a time.
    """
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Gather" or "word_embeddings" not in node.input[0] or node.input[0] not in weights:
            continue
        tensor = weights[node.input[0]]
        detached = detached_table(model)
        if detached is not None and detached.name == tensor.name:
            if folder is None:
                raise ValueError("the word-embedding table is detached: pass the folder that holds it")
            blocks: Iterable[tuple[int, np.ndarray]] = table_blocks(tensor, folder)
        else:
            blocks = [(0, numpy_helper.to_array(tensor))]
        quantized = np.empty(tuple(tensor.dims), dtype=np.int8)
        scale = np.empty((quantized.shape[0], 1), dtype=np.float32)
        for start, table in blocks:
            rows = slice(start, start + len(table))
            scale[rows, 0] = np.maximum(np.abs(table).max(1), 1e-12) / 127
            quantized[rows] = np.clip(np.round(table / scale[rows]), -127, 127)
        name, ids, looked_up = node.input[0], node.input[1], node.output[0]
        tensor.CopyFrom(numpy_helper.from_array(quantized, f"{name}_int8"))
        model.graph.initializer.append(numpy_helper.from_array(scale, f"{name}_row_scale"))
        node.input[0], node.output[0] = f"{name}_int8", f"{looked_up}_int8"
        model.graph.node.extend(
            [
                helper.make_node("Gather", [f"{name}_row_scale", ids], [f"{looked_up}_scale"]),
                helper.make_node("Cast", [f"{looked_up}_int8"], [f"{looked_up}_unscaled"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{looked_up}_unscaled", f"{looked_up}_scale"], [looked_up]),
            ]
        )
        return int(quantized.shape[0])
    return 0
