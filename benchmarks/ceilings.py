"""This machine's own ceilings: a large fp32 and a large int8 matrix product through onnxruntime.

The model is almost all matrix products (170 MFLOP per token), so these bound
what any contender can reach on the same cores; each contender's achieved
FLOP/s is reported as a share of them.
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

# A feed-forward matrix product of the model, for 512 tokens at once.
M, K, N = 512, 768, 3072


def _matmul_graph(integer: bool) -> bytes:
    a_type, b_type = (TensorProto.UINT8, TensorProto.INT8) if integer else (TensorProto.FLOAT, TensorProto.FLOAT)
    out_type = TensorProto.INT32 if integer else TensorProto.FLOAT
    op = "MatMulInteger" if integer else "MatMul"
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["c"])],
        "ceiling",
        [helper.make_tensor_value_info("a", a_type, [M, K]), helper.make_tensor_value_info("b", b_type, [K, N])],
        [helper.make_tensor_value_info("c", out_type, [M, N])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def measure(seconds: float = 3.0) -> dict[str, float]:
    """Best GFLOP/s (int8: GOP/s) of each product over about `seconds` of repeats."""
    from jobbert_onnx.runtime.sessions import session_options

    rng = np.random.default_rng(0)
    result = {}
    for name, integer in (("fp32", False), ("int8", True)):
        session = ort.InferenceSession(_matmul_graph(integer), session_options(), providers=["CPUExecutionProvider"])
        if integer:
            feeds = {
                "a": rng.integers(0, 255, (M, K), dtype=np.uint8),
                "b": rng.integers(-127, 127, (K, N), dtype=np.int8),
            }
        else:
            feeds = {
                "a": rng.standard_normal((M, K), dtype=np.float32),
                "b": rng.standard_normal((K, N), dtype=np.float32),
            }
        session.run(None, feeds)
        best = float("inf")
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            session.run(None, feeds)
            best = min(best, time.perf_counter() - start)
        result[f"{name}_gflops"] = 2 * M * K * N / best / 1e9
    return result


def flops_per_text(
    tokens: np.ndarray, layers: int = 12, hidden: int = 768, inner: int = 3072, dim: int = 1024
) -> float:
    """Mean FLOPs to encode one text of each real (unpadded) token count: matrix products only."""
    per_token = layers * 2 * (4 * hidden * hidden + 2 * hidden * inner)
    attention = layers * 2 * 2 * tokens.astype(np.float64) ** 2 * hidden
    return float((per_token * tokens + attention).mean() + 2 * hidden * dim)
