"""Output files of `embed`: written as numbered parts while the job runs, assembled at the end.

Each part is written under a temporary name and renamed, so a part that exists
is complete; an interrupted job resumes after its last part. The final file is
assembled from the parts into a temporary file and renamed into place, so a
file at the output path is always a finished one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from jobbert_onnx._files import atomic_path, write_json

OUTPUT_SUFFIXES = (".parquet", ".npy")


def part_name(index: int, suffix: str) -> str:
    return f"part-{index:06d}{suffix}"


def write_part(folder: Path, index: int, suffix: str, ids: list[Any], texts: list[Any], vectors: np.ndarray) -> None:
    """Write one part: ids, texts and vectors of one chunk."""
    with atomic_path(folder / part_name(index, suffix)) as tmp:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.write_table(_table(ids, texts, vectors), tmp)
        else:
            with open(tmp, "wb") as handle:
                np.save(handle, vectors)
            write_json(folder / part_name(index, ".ids.json"), ids, indent=None)


def _table(ids: list[Any], texts: list[Any], vectors: np.ndarray) -> Any:
    import pyarrow as pa

    dim = vectors.shape[1]
    flat = pa.array(vectors.reshape(-1), type=pa.float16() if vectors.dtype == np.float16 else pa.float32())
    id_type = pa.int64() if all(isinstance(i, int) for i in ids) else pa.string()
    return pa.table(
        {
            "id": pa.array(ids if id_type == pa.int64() else [str(i) for i in ids], type=id_type),
            "text": pa.array([t if isinstance(t, str) else None for t in texts], type=pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )


def assemble(folder: Path, parts: int, suffix: str, output: Path) -> int:
    """Join parts 0..parts-1 into `output` (atomically); return the number of rows written."""
    with atomic_path(output) as tmp:
        return (
            _assemble_parquet(folder, parts, tmp) if suffix == ".parquet" else _assemble_npy(folder, parts, tmp, output)
        )


def _assemble_parquet(folder: Path, parts: int, tmp: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_schema(folder / part_name(i, ".parquet")) for i in range(parts)]
    # ids are int64 unless some chunk had string ids: then every chunk's ids become strings.
    id_type = pa.string() if any(t.field("id").type == pa.string() for t in tables) else pa.int64()
    rows = 0
    writer = None
    for index in range(parts):
        table = pq.read_table(folder / part_name(index, ".parquet"))
        if table.schema.field("id").type != id_type:
            table = table.set_column(0, "id", table.column("id").cast(id_type))
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table)
        rows += table.num_rows
    if writer is None:
        raise ValueError("nothing to assemble")
    writer.close()
    return rows


def _assemble_npy(folder: Path, parts: int, tmp: Path, output: Path) -> int:
    arrays = [np.load(folder / part_name(i, ".npy"), mmap_mode="r") for i in range(parts)]
    rows = sum(a.shape[0] for a in arrays)
    dim, dtype = arrays[0].shape[1], arrays[0].dtype
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, dim))
    at = 0
    for array in arrays:
        out[at : at + array.shape[0]] = array
        at += array.shape[0]
    out.flush()
    del out
    with atomic_path(ids_sidecar(output)) as ids_tmp, open(ids_tmp, "w", encoding="utf-8") as handle:
        for index in range(parts):
            for row_id in json.loads((folder / part_name(index, ".ids.json")).read_text()):
                handle.write(json.dumps(row_id, ensure_ascii=False) + "\n")
    return rows


def ids_sidecar(output: Path) -> Path:
    """`vectors.npy` -> `vectors.ids.jsonl`: one JSON id per line, row for row."""
    return output.with_suffix(".ids.jsonl")
