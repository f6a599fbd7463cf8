"""The dynamic batching queue, in process: merging, splitting, budgets and admission."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from jobbert_onnx import Encoder
from jobbert_onnx.serve.queue import BatchQueue, QueueFull


@pytest.fixture(scope="module")
def encoder(tiny_exports: dict[tuple[str, str], Path]) -> Encoder:
    return Encoder.load(tiny_exports[("router", "fp32")], device="cpu", precision="fp32")


def _run(encoder: Encoder, requests: list[tuple[list[str], str]], **limits: float) -> tuple[list, list]:
    batches: list[tuple[int, int]] = []

    async def main() -> list:
        queue = BatchQueue(
            encoder,
            max_texts=int(limits.get("max_texts", 64)),
            max_tokens=int(limits.get("max_tokens", 16384)),
            max_wait_s=limits.get("max_wait_s", 0.2),
            max_queued=int(limits.get("max_queued", 1000)),
            on_batch=lambda texts, tokens: batches.append((texts, tokens)),
        )
        queue.start()
        try:
            return await asyncio.gather(*(queue.embed(texts, route) for texts, route in requests))
        finally:
            await queue.close()

    return asyncio.run(main()), batches


def test_concurrent_requests_are_merged_and_split_back(encoder: Encoder) -> None:
    requests = [([f"Engineer {i}", "Koch"], "anchor") for i in range(10)]
    results, batches = _run(encoder, requests)
    assert len(batches) < len(requests), f"10 waiting requests ran as {len(batches)} batches"
    assert sum(texts for texts, _ in batches) == 20
    for (texts, route), result in zip(requests, results, strict=True):
        np.testing.assert_allclose(result.vectors, encoder.encode(texts, task=route), atol=1e-5, rtol=0)
        assert result.tokens == int(encoder.tokenizer.tokenize(texts).lengths.sum())


def test_heads_never_share_a_batch(encoder: Encoder) -> None:
    requests = [(["python, sql"], "positive"), (["Data Analyst"], "anchor"), (["docker, aws"], "positive")]
    results, batches = _run(encoder, requests)
    assert len(batches) == 2  # one per head
    for (texts, route), result in zip(requests, results, strict=True):
        np.testing.assert_allclose(result.vectors, encoder.encode(texts, task=route), atol=1e-5, rtol=0)


def test_large_request_is_split_over_batches_within_the_budgets(encoder: Encoder) -> None:
    texts = [f"senior software engineer number {i} " * (1 + i % 5) for i in range(37)]
    results, batches = _run(encoder, [(texts, "anchor")], max_texts=8, max_tokens=200)
    assert all(count <= 8 and tokens <= 200 for count, tokens in batches), batches
    assert sum(count for count, _ in batches) == 37
    np.testing.assert_allclose(results[0].vectors, encoder.encode(texts), atol=1e-5, rtol=0)


def test_admission_beyond_the_queue_limit_is_refused(encoder: Encoder) -> None:
    async def main() -> None:
        queue = BatchQueue(encoder, max_texts=64, max_tokens=16384, max_wait_s=0.5, max_queued=3)
        queue.start()
        try:
            first = asyncio.ensure_future(queue.embed(["a", "b", "c"], "anchor"))
            await asyncio.sleep(0.05)
            assert queue.queued == 3
            with pytest.raises(QueueFull, match="limit 3"):
                await queue.embed(["d"], "anchor")
            assert len((await first).vectors) == 3
            assert queue.queued == 0
        finally:
            await queue.close()

    asyncio.run(main())


def test_the_server_warms_up_on_the_thread_that_encodes(encoder: Encoder, tiny_exports: dict) -> None:
    """Buffers and CUDA graphs are kept per thread: a warm-up elsewhere would leave the encoding thread cold."""
    import threading

    from starlette.testclient import TestClient

    from jobbert_onnx.serve.app import build_app
    from jobbert_onnx.serve.config import ServeConfig

    threads: dict[str, set[str]] = {"warm-up": set(), "request": set()}
    phase = ["warm-up"]
    run = encoder.encode_tokenized

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads[phase[0]].add(threading.current_thread().name)
        return run(*args, **kwargs)

    encoder.encode_tokenized = recording  # type: ignore[method-assign]
    try:
        config = ServeConfig(model_dir=str(tiny_exports[("router", "fp32")]), devices=("cpu",))
        with TestClient(build_app(encoder, config)) as client:
            for _ in range(100):
                if client.get("/ready").status_code == 200:
                    break
                threading.Event().wait(0.05)
            phase[0] = "request"
            response = client.post("/v1/embeddings", json={"input": ["Koch", "Data Analyst"], "model": "jobbert-v3"})
            assert response.status_code == 200, response.text
    finally:
        del encoder.encode_tokenized
    assert threads["warm-up"] and threads["warm-up"] == threads["request"], threads
