"""Write the four ONNX graphs: encoder, mean pooling, and one graph per head.

The encoder is traced from the transformers model with eager attention (the
form onnxruntime's transformer optimizer recognises), then fused (Attention,
SkipLayerNormalization, BiasGelu), and written in each requested precision:
fp32, fp16 (for GPUs, with fp32 inputs and outputs) and int8 (dynamic
quantization, for CPUs). Pooling and the heads are small enough to write
directly; they stay in fp32 in every precision, so the masked sum, the division
by the token count, and the Dense + Tanh keep full precision.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jobbert_onnx.export.hf import load_encoder
from jobbert_onnx.export.source import HeadSpec, ModelSpec, load_state
from jobbert_onnx.manifest import (
    ATTENTION_MASK,
    EMBEDDING,
    INPUT_IDS,
    PRECISIONS,
    SENTENCE_EMBEDDING,
    TOKEN_EMBEDDINGS,
)

OPSET = 17
ENCODER_INPUTS = (INPUT_IDS, ATTENTION_MASK)


def export_encoder(spec: ModelSpec, path: Path) -> None:
    """Trace the encoder to an fp32 ONNX graph with dynamic batch and sequence axes."""
    import torch

    # Eager attention traces to the pattern onnxruntime's optimizer fuses into Attention.
    model = load_encoder(spec, attention="eager")

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    # A trace input with padding, so the mask path is exercised while tracing.
    ids = torch.tensor([[0, 10, 11, 12, 2], [0, 13, 2, 1, 1]], dtype=torch.int64)
    mask = (ids != spec.encoder_config.get("pad_token_id", 1)).to(torch.int64)
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimize_model(
            str(raw),
            model_type="bert",
            num_heads=int(config["num_attention_heads"]),
            hidden_size=int(config["hidden_size"]),
            optimization_options=options,
            opt_level=0,
        )
    model.save_model_to_file(str(out))


def write_variant(fused: Path, out: Path, precision: str) -> dict[str, int]:
    """Write the encoder in one precision from the fused fp32 graph.

    - fp32: the fused graph as it is.
    - fp16: weights and activations in half precision; the inputs stay int64 and
      the output fp32, so pooling and heads run in fp32.
    - int8: dynamic quantization for the CPU: per-channel int8 weights for every
      MatMul and the fused Attention (which becomes QAttention), activations
      quantized per batch at run time, and the word-embedding table stored as
      int8 (a quarter of the size, dequantized on lookup).

    Returns:
        Counts of the fused and quantized node types in the written graph.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from: {', '.join(PRECISIONS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if precision == "fp32":
            shutil.copyfile(fused, out)
        elif precision == "fp16":
            from onnxruntime.transformers.onnx_model import OnnxModel

            model = OnnxModel(onnx.load(str(fused)))
            model.convert_float_to_float16(keep_io_types=True)
            model.save_model_to_file(str(out))
        else:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # The quantizer logs a generic pre-processing hint on the root logger; the
            # graph is already optimized, so the hint does not apply.
            logging.disable(logging.WARNING)
            try:
                quantize_dynamic(
                    str(fused),
                    str(out),
                    per_channel=True,
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Attention", "Gather"],
                    # The fused contrib ops carry no type information for shape inference.
                    extra_options={"DefaultTensorType": TensorProto.FLOAT},
                )
            finally:
                logging.disable(logging.NOTSET)
    return fused_node_counts(onnx.load(str(out), load_external_data=False))


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
    """Mean pooling over real tokens: sum(h * mask) / max(sum(mask), 1e-9), in fp32.

    Matches sentence-transformers' Pooling(mean), including its clamp of the
    token count, so an all-padding row gives zeros rather than NaN.
    """
    token = helper.make_tensor_value_info(TOKEN_EMBEDDINGS, TensorProto.FLOAT, ["batch", "sequence", hidden_size])
    mask = helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info(SENTENCE_EMBEDDING, TensorProto.FLOAT, ["batch", hidden_size])
    nodes = [
        helper.make_node("Cast", [ATTENTION_MASK], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "last_axis"], ["mask_3d"]),
        helper.make_node("Mul", [TOKEN_EMBEDDINGS, "mask_3d"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "seq_axis"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask_f", "seq_axis"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "min_count"], ["count_safe"]),
        helper.make_node("Div", ["summed", "count_safe"], [SENTENCE_EMBEDDING]),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "seq_axis"),
        numpy_helper.from_array(np.array(1e-9, dtype=np.float32), "min_count"),
    ]
    _save(helper.make_graph(nodes, "mean_pooling", [token, mask], [out], inits), path)


def write_head(path: Path, head: HeadSpec) -> None:
    """One Dense + Tanh head, fp32: tanh(x W^T + b)."""
    state = load_state(head.weights)
    weight, bias = state.get("linear.weight"), state.get("linear.bias")
    expected = (head.out_features, head.in_features)
    if weight is None or bias is None or weight.shape != expected or bias.shape != (head.out_features,):
        found = {k: list(v.shape) for k, v in state.items()}
        raise ValueError(
            f"{head.weights} holds {found}; "
            f"expected linear.weight {list(expected)} and linear.bias [{head.out_features}]"
        )
    x = helper.make_tensor_value_info(SENTENCE_EMBEDDING, TensorProto.FLOAT, ["batch", head.in_features])
    y = helper.make_tensor_value_info(EMBEDDING, TensorProto.FLOAT, ["batch", head.out_features])
    nodes = [
        helper.make_node("Gemm", [SENTENCE_EMBEDDING, "weight", "bias"], ["dense"], transB=1),
        helper.make_node("Tanh", ["dense"], [EMBEDDING]),
    ]
    inits = [
        numpy_helper.from_array(weight.astype(np.float32), "weight"),
        numpy_helper.from_array(bias.astype(np.float32), "bias"),
    ]
    _save(helper.make_graph(nodes, f"head_{head.route}", [x], [y], inits), path)
