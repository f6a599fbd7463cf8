"""The word-embedding table kept out of the encoder's intermediate graphs.

The table (250,002 x 768: two thirds of JobBERT-v3's weights) is written once, as
raw fp32, to `WORD_EMBEDDINGS_FILE` beside the traced graph, which refers to it as
ONNX external data. The passes load the graphs without it (``load_external_data=False``),
so their in-memory copies leave it out; onnxruntime runs such a graph from its file,
reading the table itself; each variant takes the table back as it is written out
(`attach_word_embeddings`), so the exported files hold it as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from jobbert_onnx.errors import SetupError
from jobbert_onnx.manifest import INPUT_IDS

WORD_EMBEDDINGS_FILE = "word_embeddings.fp32.bin"


def word_embeddings(model: onnx.ModelProto) -> onnx.TensorProto:
    """The initializer the Gather on the input ids reads: the word-embedding table."""
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[1] == INPUT_IDS and node.input[0] in weights:
            return weights[node.input[0]]
    raise SetupError("the traced encoder has no Gather of the input ids from an initializer: the word embeddings")


def refer_to_table(model: onnx.ModelProto, rows: int, hidden: int) -> None:
    """Make the word-embedding initializer a reference to `WORD_EMBEDDINGS_FILE` (fp32, [rows, hidden])."""
    tensor = word_embeddings(model)
    name = tensor.name
    tensor.Clear()
    tensor.name, tensor.data_type, tensor.data_location = name, TensorProto.FLOAT, TensorProto.EXTERNAL
    tensor.dims.extend([rows, hidden])
    for key, value in (("location", WORD_EMBEDDINGS_FILE), ("offset", "0"), ("length", str(rows * hidden * 4))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def detached_table(model: onnx.ModelProto) -> onnx.TensorProto | None:
    """The word-embedding initializer where it still refers to `WORD_EMBEDDINGS_FILE`; else None."""
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            location = next((entry.value for entry in tensor.external_data if entry.key == "location"), None)
            if location == WORD_EMBEDDINGS_FILE:
                return tensor
    return None


def attach_word_embeddings(model: onnx.ModelProto, folder: Path, data_type: int = TensorProto.FLOAT) -> bool:
    """Put the word-embedding table from `folder` back into the graph, in place, as fp32 or fp16
    (with the clamping onnxruntime's fp16 converter applies); False where it is already there."""
    tensor = detached_table(model)
    if tensor is None:
        return False
    if data_type == TensorProto.FLOAT16:
        from onnxruntime.transformers.float16 import convert_np_to_float16

        table = np.empty(tuple(tensor.dims), dtype=np.float16)
        for start, block in table_blocks(tensor, folder):
            table[start : start + len(block)] = convert_np_to_float16(block)
        data = table.tobytes()
        del table
    else:
        data = (folder / WORD_EMBEDDINGS_FILE).read_bytes()
        _check_size(tensor, folder, len(data) // 4)
    del tensor.external_data[:]
    tensor.ClearField("data_location")
    tensor.data_type = data_type
    tensor.raw_data = data
    return True


def table_blocks(tensor: onnx.TensorProto, folder: Path, rows: int = 16384) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, fp32 rows) of a detached table, a block at a time, so that whatever is computed
    from it needs no more than a block's worth of temporaries."""
    total, hidden = (int(size) for size in tensor.dims)
    _check_size(tensor, folder, (folder / WORD_EMBEDDINGS_FILE).stat().st_size // 4)
    with (folder / WORD_EMBEDDINGS_FILE).open("rb") as file:
        for start in range(0, total, rows):
            count = min(rows, total - start)
            yield start, np.fromfile(file, dtype=np.float32, count=count * hidden).reshape(count, hidden)


def _check_size(tensor: onnx.TensorProto, folder: Path, values: int) -> None:
    shape = tuple(tensor.dims)
    if values != int(np.prod(shape)):
        raise SetupError(f"{folder / WORD_EMBEDDINGS_FILE} holds {values} values, not {shape}: export again")
