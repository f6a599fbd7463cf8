"""Scale-out of `embed` on a Ray cluster with Ray Data.

The driver reads and checks the input exactly as a local run does and writes
the same parts; only the encoding moves to the cluster. Chunks travel as a
Ray Dataset through `map_batches` with a pool of actors, one per worker, each
loading the model once (with one GPU each where the cluster has GPUs). A
window of chunks is in flight at a time and comes back in order, so the output
is identical to a single-process run. Ray is an optional extra
(``pip install 'jobbert-onnx[ray]'``); nothing else imports this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from jobbert_onnx.errors import missing_extra


class ChunkEncoder:
    """A Ray Data actor: loads the export once, then encodes one chunk per call."""

    def __init__(self, model_dir: str, task: str, batch_size: int | None, device: str, precision: str | None) -> None:
        from jobbert_onnx.runtime import Encoder

        self.encoder = Encoder.load(model_dir, device=device, precision=precision)
        self.task = self.encoder.resolve_task(task)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        # Vectors travel as raw float32 bytes plus a row count: a plain column type for any chunk size.
        payloads, rows = [], []
        for texts in batch["texts"]:
            chunk = [str(t) for t in texts]
            vectors = self.encoder.encode(chunk, task=self.task, batch_size=self.batch_size) if chunk else None
            payloads.append(b"" if vectors is None else np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
            rows.append(len(chunk))
        return {"index": batch["index"], "rows": np.asarray(rows, dtype=np.int64), "vectors": payloads}


def actor_placement(device: str, cluster_gpus: int) -> tuple[str, int]:
    """The device each actor loads on, and the GPUs it reserves: ``auto`` takes a GPU where the
    cluster has them; an explicit ``cpu`` stays on the CPU even there, and ``cuda``/``cuda:N``
    reserve one GPU each (Ray shows each actor its own GPU as ``cuda``)."""
    if device == "cpu" or (device == "auto" and cluster_gpus == 0):
        return device, 0
    return "cuda", 1


def ray_encoder(
    model_dir: str,
    task: str,
    batch_size: int | None,
    device: str,
    precision: str | None,
    address: str | None,
    actors: int | None = None,
    window: int | None = None,
) -> Any:
    """encode_chunks that runs on Ray: `address` None starts (or joins) a local instance."""
    try:
        import ray
    except ImportError as error:
        raise missing_extra("--ray", "ray", error) from error
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    resources = ray.cluster_resources()
    actor_device, gpus_each = actor_placement(device, int(resources.get("GPU", 0)))
    pool = actors or max(1, int(resources.get("GPU", 0)) if gpus_each else int(resources.get("CPU", 1)) // 2)
    in_flight = window or 2 * pool
    from jobbert_onnx.manifest import read_manifest

    dim = read_manifest(model_dir).output_dim

    def run_window(items: list[dict[str, Any]]) -> list[np.ndarray]:
        dataset = ray.data.from_items(items)
        encoded = dataset.map_batches(
            ChunkEncoder,
            fn_constructor_kwargs={
                "model_dir": model_dir,
                "task": task,
                "batch_size": batch_size,
                "device": actor_device,
                "precision": precision,
            },
            batch_size=1,
            concurrency=pool,
            num_gpus=gpus_each,
            batch_format="numpy",
        )
        rows = sorted(encoded.take_all(), key=lambda row: int(row["index"]))
        if [int(row["index"]) for row in rows] != [item["index"] for item in items]:
            raise RuntimeError("Ray returned a different set of chunks than it was given")
        return [np.frombuffer(row["vectors"], dtype=np.float32).reshape(int(row["rows"]), dim) for row in rows]

    def encode_chunks(chunks: Iterator[list[str]]) -> Iterator[np.ndarray]:
        items: list[dict[str, Any]] = []
        for index, texts in enumerate(chunks):
            items.append({"index": index, "texts": texts})
            if len(items) == in_flight:
                yield from run_window(items)
                items = []
        if items:
            yield from run_window(items)

    return encode_chunks
