"""Write the four ONNX graphs: encoder, mean pooling, and one graph per head.

The encoder is traced from the transformers model with eager attention (the
form onnxruntime's transformer optimizer recognises), then fused (Attention,
SkipLayerNormalization, BiasGelu), and written in each requested precision:
fp32, fp16 (for GPUs, with fp32 inputs and outputs) and int8 (per-token
int8, for CPUs); the CPU variants have SkipLayerNormalization split back
into Add + LayerNormalization, which onnxruntime's CPU provider runs faster.
Pooling and the heads are small enough to write directly; they stay in fp32 in
every precision, so the masked sum, the division by the token count, and the
Dense + Tanh keep full precision.

The word-embedding table (250,002 x 768: two thirds of JobBERT-v3's weights) stays
out of the graphs while they are traced, fused and rewritten: the trace writes it to
`embedding_table.WORD_EMBEDDINGS_FILE` beside the graph, which refers to it as ONNX external data,
so every in-memory copy those passes make (shape inference, the optimizer's) leaves
it out, and each variant takes it back only when it is written out, in its own
precision (`attach_word_embeddings`). onnxruntime runs the intermediate graphs as
they are, reading the table from the file.

The fused Attention nodes learn about padding from a mask input whose form
decides which attention kernel onnxruntime may run (`ATTENTION_MASKS`). The
tokenizer pads on the right, so every form below describes the same padding.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jobbert_onnx.errors import SetupError, UsageError
from jobbert_onnx.export.embedding_table import (
    WORD_EMBEDDINGS_FILE,
    attach_word_embeddings,
    detached_table,
    refer_to_table,
)
from jobbert_onnx.export.graph_edit import topological_sort
from jobbert_onnx.export.hf import load_encoder
from jobbert_onnx.export.quantize import Calibration, write_int8
from jobbert_onnx.export.source import HeadSpec, ModelSpec, UnsupportedModelError, load_state
from jobbert_onnx.manifest import (
    ATTENTION_MASK,
    ATTENTION_MASKS,
    EMBEDDING,
    INPUT_IDS,
    PRECISIONS,
    SENTENCE_EMBEDDING,
    TOKEN_EMBEDDINGS,
)

OPSET = 17
ENCODER_INPUTS = (INPUT_IDS, ATTENTION_MASK)

# Per precision: fp16 runs on GPUs, where a fused kernel needs "lengths-starts"; the CPU variants
# keep the optimizer's form, which is what their benchmarks measured.
DEFAULT_ATTENTION_MASK = {"fp16": "lengths-starts", "fp32": "lengths", "int8": "lengths"}
# The CPU variants split SkipLayerNormalization into Add + LayerNormalization: onnxruntime's
# CPU kernel for the fused node is the slower of the two (int8 encoder, 2 cores, best of many:
# 499 against 385 ms for 32 skill lists of 64 tokens, 93 against 84 ms for 32 titles;
# studies/HISTORY.md, "Skill lists: the gap was SkipLayerNormalization").
# fp16 keeps the fused node, whose CUDA kernel is the point of fusing.
SPLIT_SKIP_NORMS = frozenset({"fp32", "int8"})
_SPLIT_MARK = "split from SkipLayerNormalization for the CPU"
# Rows of the stand-in table the trace sees: more than any token id of the trace input.
_TRACE_ROWS = 16


def export_encoder(spec: ModelSpec, path: Path) -> None:
    """Trace the encoder to an fp32 ONNX graph with dynamic batch and sequence axes; its
    word-embedding table goes to `WORD_EMBEDDINGS_FILE` beside it (`embedding_table`)."""
    import torch

    # Eager attention traces to the pattern onnxruntime's optimizer fuses into Attention.
    model = load_encoder(spec, attention="eager")
    # The trace sees a stand-in table; the real one goes to a file the graph refers to.
    table = model.get_input_embeddings().weight.detach().numpy()
    rows, hidden = table.shape
    table.astype(np.float32, copy=False).tofile(path.parent / WORD_EMBEDDINGS_FILE)
    del table
    model.set_input_embeddings(torch.nn.Embedding(_TRACE_ROWS, hidden))
    _trace(model, int(spec.encoder_config["pad_token_id"]), path)
    del model
    graph = onnx.load(str(path))
    refer_to_table(graph, rows, hidden)
    onnx.save(graph, str(path))


def _trace(model: Any, pad: int, path: Path) -> None:
    import torch

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    # A trace input with padding, so the mask path is exercised while tracing; the ids
    # only need to differ from the pad id (XLM-R numbers positions by comparing with it).
    real = [token for token in range(3, 10) if token != pad]
    ids = torch.tensor([real[:5], [*real[:3], pad, pad]], dtype=torch.int64)
    mask = (ids != pad).to(torch.int64)
    dynamic = {"batch": 0, "sequence": 1}
    axes = {name: {v: k for k, v in dynamic.items()} for name in (*ENCODER_INPUTS, TOKEN_EMBEDDINGS)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            TokenEmbeddings().eval(),
            (ids, mask),
            str(path),
            input_names=list(ENCODER_INPUTS),
            output_names=[TOKEN_EMBEDDINGS],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def fuse_encoder(raw: Path, out: Path, spec: ModelSpec) -> None:
    """Fuse the traced fp32 encoder with onnxruntime's transformer optimizer (still fp32)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    config = spec.encoder_config
    options = FusionOptions("bert")
    options.enable_gelu_approximation = False  # keep erf-GELU exact
    # BERT's embeddings would fuse into EmbedLayerNormalization, which takes the mask on
    # its own path: kept apart, every encoder has the word-embedding Gather, the embedding
    # LayerNorm and the one ReduceSum mask that the passes below edit.
    options.enable_embed_layer_norm = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimize_model(
            onnx.load(str(raw), load_external_data=False),
            model_type="bert",
            num_heads=int(config["num_attention_heads"]),
            hidden_size=int(config["hidden_size"]),
            optimization_options=options,
            opt_level=0,
        )
    model.save_model_to_file(str(out))


def set_attention_mask(model: onnx.ModelProto, form: str) -> None:
    """Give every fused Attention node its padding mask in `form` (one of `ATTENTION_MASKS`), in place.

    The optimizer feeds all Attention nodes one [batch] tensor of key lengths,
    ``ReduceSum(Cast(attention_mask, int32), axis=1)``; the other forms are
    computed from the same int32 mask, on the device, with no shape arithmetic
    that would put a node on the CPU.
    """
    if form not in ATTENTION_MASKS:
        raise UsageError(f"unknown attention mask form {form!r}; choose from: {', '.join(ATTENTION_MASKS)}")
    attention = [node for node in model.graph.node if node.op_type == "Attention"]
    lengths = {node.input[3] for node in attention if len(node.input) > 3}
    producers = {output: node for node in model.graph.node for output in node.output}
    source = producers.get(next(iter(lengths))) if len(lengths) == 1 else None
    if not attention or source is None or source.op_type != "ReduceSum":
        raise SetupError(
            "the fused encoder's Attention nodes do not share one ReduceSum mask input; "
            "this onnxruntime's optimizer fuses differently: export with another onnxruntime version"
        )
    mask_int32 = source.input[0]
    if form == "lengths":
        return
    if form == "2d":
        new_mask = mask_int32
    else:
        new_mask = "attention_mask_lengths_starts"
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(0, dtype=np.int32), "mask_zero"),
                numpy_helper.from_array(np.array(1, dtype=np.int32), "mask_one"),
                numpy_helper.from_array(np.array([0], dtype=np.int32), "mask_first_start"),
                numpy_helper.from_array(np.array([1], dtype=np.int64), "mask_row_axis"),
                numpy_helper.from_array(np.array(0, dtype=np.int64), "mask_batch_axis"),
            ]
        )
        model.graph.node.extend(
            [
                # Each row's padded width, as a [batch] vector: starts are its running sum.
                helper.make_node("Mul", [mask_int32, "mask_zero"], ["mask_zeros"]),
                helper.make_node("Add", ["mask_zeros", "mask_one"], ["mask_ones"]),
                helper.make_node("ReduceSum", ["mask_ones", "mask_row_axis"], ["mask_widths"], keepdims=0),
                helper.make_node("CumSum", ["mask_widths", "mask_batch_axis"], ["mask_ends"]),
                helper.make_node("Concat", ["mask_first_start", "mask_ends"], ["mask_starts"], axis=0),
                helper.make_node("Concat", [source.output[0], "mask_starts", "mask_starts"], [new_mask], axis=0),
            ]
        )
    for node in attention:
        node.input[3] = new_mask
    topological_sort(model.graph)


def split_skip_layer_norms(model: onnx.ModelProto) -> int:
    """SkipLayerNormalization(x, skip, gamma, beta[, bias]) -> LayerNormalization(x + skip [+ bias]), in place.

    A node whose mean, inverse deviation or sum output is read stays fused. Returns how
    many nodes were split.
    """
    nodes: list[onnx.NodeProto] = []
    split = 0
    for node in model.graph.node:
        if node.op_type != "SkipLayerNormalization" or any(name for name in node.output[1:]):
            nodes.append(node)
            continue
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        x, skip, gamma, beta = node.input[:4]
        name = node.name or node.output[0]
        summed = f"{name}_sum"
        nodes.append(helper.make_node("Add", [x, skip], [summed], name=f"{name}_add"))
        if len(node.input) > 4 and node.input[4]:
            nodes.append(helper.make_node("Add", [summed, node.input[4]], [f"{summed}_bias"], name=f"{name}_bias"))
            summed = f"{summed}_bias"
        nodes.append(
            helper.make_node(
                "LayerNormalization",
                [summed, gamma, beta],
                [node.output[0]],
                name=name,
                doc_string=_SPLIT_MARK,
                axis=-1,
                epsilon=epsilon,
            )
        )
        split += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return split


def fuse_split_layer_norms(model: onnx.ModelProto) -> int:
    """Undo `split_skip_layer_norms`, in place (for an fp16 variant made from a CPU variant); returns how many."""
    producers = {output: node for node in model.graph.node for output in node.output}
    dropped: set[int] = set()
    fused = 0
    for index, node in enumerate(model.graph.node):
        if node.op_type != "LayerNormalization" or node.doc_string != _SPLIT_MARK:
            continue
        adds = [producers[node.input[0]]]
        bias: list[str] = []
        if adds[0].name == f"{node.name}_bias":
            bias = [adds[0].input[1]]
            adds.insert(0, producers[adds[0].input[0]])
        epsilon = next(a.f for a in node.attribute if a.name == "epsilon")
        model.graph.node[index].CopyFrom(
            helper.make_node(
                "SkipLayerNormalization",
                [*adds[0].input, *node.input[1:], *bias],
                [node.output[0]],
                name=node.name,
                domain="com.microsoft",
                epsilon=epsilon,
            )
        )
        dropped.update(id(add) for add in adds)
        fused += 1
    kept = [node for node in model.graph.node if id(node) not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return fused


def write_variant(
    fused: Path,
    out: Path,
    precision: str,
    attention_mask: str | None = None,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """Write the encoder in one precision from the fused fp32 graph.

    - fp32: the fused graph as it is.
    - fp16: weights and activations in half precision; the inputs stay int64 and
      the output fp32, so pooling and heads run in fp32.
    - int8: for the CPU (`quantize.write_int8`): every matrix product in int8 with a
      scale per output column for the weights and per token for the activations (so a
      text's vector does not depend on its batch), the fused Attention split into its
      QKV product and MultiHeadAttention, outlier channels smoothed into the weights
      (scales from `calibration`), the word-embedding table in int8 with a scale per row.

    `attention_mask` is the form of the Attention nodes' mask input (`ATTENTION_MASKS`);
    None takes the precision's default (`DEFAULT_ATTENTION_MASK`). The CPU variants have
    their SkipLayerNormalization nodes split (`SPLIT_SKIP_NORMS`).

    Returns:
        What the manifest records of the variant: ``nodes`` (counts of the fused and
        quantized node types), ``attention_mask``, and for int8 ``quantization``.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose from: {', '.join(PRECISIONS)}")
    form = attention_mask or DEFAULT_ATTENTION_MASK[precision]
    facts: dict[str, Any] = {"attention_mask": form}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The word-embedding table, where the graph refers to it, is read only as the variant is written.
        model = onnx.load(str(fused), load_external_data=False)
        if form != "lengths":
            set_attention_mask(model, form)
        if precision in SPLIT_SKIP_NORMS:
            facts["skip_layer_norms_split"] = split_skip_layer_norms(model)
        else:
            fuse_split_layer_norms(model)
        if precision == "fp32":
            attach_word_embeddings(model, fused.parent)
            onnx.save(model, str(out))
        elif precision == "fp16":
            _write_fp16(model, fused.parent, out)
        elif calibration is None:
            raise ValueError("the int8 variant needs calibration texts to choose its smoothing")
        else:
            # The quantizer reads the graph from a file, several times; beside the table it refers to.
            staged = fused.with_name(f"{out.stem}.staged.onnx")
            onnx.save(model, str(staged))
            del model
            try:
                facts["quantization"] = write_int8(staged, out, calibration)
            finally:
                staged.unlink(missing_ok=True)
    return {"nodes": fused_node_counts(onnx.load(str(out), load_external_data=False)), **facts}


def _write_fp16(model: onnx.ModelProto, folder: Path, out: Path) -> None:
    """Convert to fp16 with onnxruntime's converter (inputs and outputs kept), and write.

    A detached word-embedding table is converted apart: the converter is given a one-row
    stand-in (it reads every initializer it converts, and makes copies of the whole
    graph), and the table, converted with the converter's own clamping, takes the
    stand-in's place, with the shape the converter recorded for it corrected.
    """
    from onnxruntime.transformers.onnx_model import OnnxModel

    detached = detached_table(model)
    if detached is not None:
        name, shape = detached.name, list(detached.dims)
        detached.CopyFrom(numpy_helper.from_array(np.zeros((1, shape[1]), dtype=np.float32), name))
    half = OnnxModel(model)
    half.convert_float_to_float16(keep_io_types=True)
    if detached is not None:
        refer_to_table(half.model, *shape)
        attach_word_embeddings(half.model, folder, TensorProto.FLOAT16)
        for info in half.model.graph.value_info:
            if info.name == name:
                for dim, size in zip(info.type.tensor_type.shape.dim, shape, strict=True):
                    dim.dim_value = size
    half.save_model_to_file(str(out))


def fused_node_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many fused transformer nodes a graph holds."""
    counts = Counter(node.op_type for node in model.graph.node)
    fused = (
        "Attention",
        "MultiHeadAttention",
        "SkipLayerNormalization",
        "BiasGelu",
        "Gelu",
        "FastGelu",
        "LayerNormalization",
        "QAttention",
        "MatMulInteger",
        "DynamicQuantizeLinear",
        "MatMulIntegerToFloat",
        "QuantizeLinear",
    )
    return {name: counts[name] for name in fused if counts[name]}


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="jobbert-onnx",
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_pooling(path: Path, hidden_size: int) -> None:
    """Mean pooling over real tokens: sum(where(mask, h, 0)) / max(sum(mask), 1e-9), in fp32.

    Matches sentence-transformers' Pooling(mean), including its clamp of the
    token count, so an all-padding row gives zeros rather than NaN. Padded
    positions are selected away rather than multiplied by 0: whatever an
    attention kernel leaves there (NaN, Inf) never reaches a row's vector, as
    NaN x 0 would.
    """
    token = helper.make_tensor_value_info(TOKEN_EMBEDDINGS, TensorProto.FLOAT, ["batch", "sequence", hidden_size])
    mask = helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info(SENTENCE_EMBEDDING, TensorProto.FLOAT, ["batch", hidden_size])
    nodes = [
        helper.make_node("Cast", [ATTENTION_MASK], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", [ATTENTION_MASK], ["mask_b"], to=TensorProto.BOOL),
        helper.make_node("Unsqueeze", ["mask_b", "last_axis"], ["mask_3d"]),
        helper.make_node("Where", ["mask_3d", TOKEN_EMBEDDINGS, "zero"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "seq_axis"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask_f", "seq_axis"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "min_count"], ["count_safe"]),
        helper.make_node("Div", ["summed", "count_safe"], [SENTENCE_EMBEDDING]),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "seq_axis"),
        numpy_helper.from_array(np.array(1e-9, dtype=np.float32), "min_count"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
    ]
    _save(helper.make_graph(nodes, "mean_pooling", [token, mask], [out], inits), path)


def write_head(path: Path, head: HeadSpec) -> None:
    """One Dense + Tanh head, fp32: tanh(x W^T + b), then divided by max(||.||_2, 1e-12) where the
    model normalizes (sentence-transformers' Normalize: torch's F.normalize)."""
    state = load_state(head.weights)
    weight, bias = state.get("linear.weight"), state.get("linear.bias")
    expected = (head.out_features, head.in_features)
    if weight is None or bias is None or weight.shape != expected or bias.shape != (head.out_features,):
        found = {k: list(v.shape) for k, v in state.items()}
        raise UnsupportedModelError(
            f"{head.weights} holds {found}; "
            f"expected linear.weight {list(expected)} and linear.bias [{head.out_features}]"
        )
    x = helper.make_tensor_value_info(SENTENCE_EMBEDDING, TensorProto.FLOAT, ["batch", head.in_features])
    y = helper.make_tensor_value_info(EMBEDDING, TensorProto.FLOAT, ["batch", head.out_features])
    nodes = [
        helper.make_node("Gemm", [SENTENCE_EMBEDDING, "weight", "bias"], ["dense"], transB=1),
        helper.make_node("Tanh", ["dense"], ["activated" if head.normalize else EMBEDDING]),
    ]
    inits = [
        numpy_helper.from_array(weight.astype(np.float32), "weight"),
        numpy_helper.from_array(bias.astype(np.float32), "bias"),
    ]
    if head.normalize:
        nodes += [
            helper.make_node("ReduceL2", ["activated"], ["norm"], axes=[-1], keepdims=1),
            helper.make_node("Max", ["norm", "min_norm"], ["norm_safe"]),
            helper.make_node("Div", ["activated", "norm_safe"], [EMBEDDING]),
        ]
        inits.append(numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "min_norm"))
    _save(helper.make_graph(nodes, f"head_{head.route}", [x], [y], inits), path)
