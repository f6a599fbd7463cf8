"""Repeated texts are encoded once (encode, encode_tokenized, embed, the server's batches and
its optional vector cache), and the vectors come back as if each had been encoded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from jobbert_onnx import Encoder, Tuning
from jobbert_onnx.runtime.encoder import distinct
from jobbert_onnx.serve.queue import BatchQueue, VectorCache

TEXTS = ["Sales Associate", "Koch", "Sales Associate", "Data Analyst", "Koch", "Sales Associate", ""]


class _Rows:
    """Counts the rows the encoder's graphs run."""

    def __init__(self, encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows = 0
        run = encoder.chain.run_into

        def counting(batch, route, out, rows):  # type: ignore[no-untyped-def]
            self.rows += int((batch.attention_mask.sum(1) > 0).sum()) if batch.input_ids.size else 0
            return run(batch, route, out, rows)

        monkeypatch.setattr(encoder.chain, "run_into", counting)


@pytest.fixture(scope="module")
def plain(tiny_exports: dict[tuple[str, str], Path]) -> Encoder:
    return Encoder.load(tiny_exports[("router", "fp32")], device="cpu", precision="fp32", tuning=Tuning(dedup=False))


@pytest.fixture()
def deduped(tiny_exports: dict[tuple[str, str], Path]) -> Encoder:
    return Encoder.load(tiny_exports[("router", "fp32")], device="cpu", precision="fp32")


def test_distinct_keeps_first_appearance_order() -> None:
    unique, index = distinct(["b", "a", "b", "c", "a"])
    assert unique == ["b", "a", "c"] and index is not None and index.tolist() == [0, 1, 0, 2, 1]
    same, none = distinct(["x", "y"])
    assert same == ["x", "y"] and none is None


@pytest.mark.parametrize("task", ["anchor", "positive"])
def test_encode_runs_each_distinct_text_once(
    deduped: Encoder, plain: Encoder, monkeypatch: pytest.MonkeyPatch, task: str
) -> None:
    rows = _Rows(deduped, monkeypatch)
    got = deduped.encode(TEXTS, task=task)
    assert rows.rows == len(set(TEXTS))
    np.testing.assert_allclose(got, plain.encode(TEXTS, task=task), atol=1e-6, rtol=0)
    for text in set(TEXTS):
        copies = got[[i for i, t in enumerate(TEXTS) if t == text]]
        assert (copies == copies[0]).all(), "every copy of a text gets the very same vector"


def test_normalize_and_truncate_apply_to_every_copy(deduped: Encoder, plain: Encoder) -> None:
    got = deduped.encode(TEXTS, normalize_embeddings=True, truncate_dim=64)
    want = plain.encode(TEXTS, normalize_embeddings=True, truncate_dim=64)
    assert got.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_encode_tokenized_runs_each_distinct_row_once(
    deduped: Encoder, plain: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "Koch" and "Koch " tokenize alike: one row for both
    texts = [*TEXTS, "Koch "]
    tokenized = deduped.tokenizer.tokenize(texts)
    rows = _Rows(deduped, monkeypatch)
    got = deduped.encode_tokenized(tokenized, task="anchor")
    assert rows.rows == len({tuple(ids) for ids in tokenized.ids}) == len(set(TEXTS))
    np.testing.assert_allclose(got, plain.encode(texts, task="anchor"), atol=1e-6, rtol=0)


def test_the_vector_cache_is_a_bounded_lru() -> None:
    cache = VectorCache(2)
    one, two, three = (np.full(4, v, dtype=np.float32) for v in (1, 2, 3))
    cache.put(("anchor", (1,)), one)
    cache.put(("anchor", (2,)), two)
    assert cache.get(("anchor", (1,))) is one  # now the most recent
    cache.put(("anchor", (3,)), three)
    assert len(cache) == 2 and cache.get(("anchor", (2,))) is None
    assert cache.get(("anchor", (1,))) is one and cache.get(("positive", (1,))) is None


def test_the_server_cache_answers_repeats_without_encoding(
    deduped: Encoder, plain: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[tuple[int, int]] = []
    rows = _Rows(deduped, monkeypatch)

    async def main() -> list:
        queue = BatchQueue(
            deduped, max_texts=64, max_tokens=16384, max_wait_s=0.01, max_queued=1000,
            cache=VectorCache(100), on_cache=lambda hits, misses: lookups.append((hits, misses)),
        )  # fmt: skip
        queue.start()
        try:
            first = await queue.embed(["Koch", "Data Analyst"], "anchor")
            second = await queue.embed(["Data Analyst", "Chef", "Koch"], "anchor")
            other_head = await queue.embed(["Koch"], "positive")
            return [first, second, other_head]
        finally:
            await queue.close()

    first, second, other_head = asyncio.run(main())
    assert lookups == [(0, 2), (2, 1), (0, 1)]
    assert rows.rows == 4, "Data Analyst and Koch ran once for the anchor head"
    np.testing.assert_allclose(first.vectors, plain.encode(["Koch", "Data Analyst"]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(second.vectors, plain.encode(["Data Analyst", "Chef", "Koch"]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(other_head.vectors, plain.encode(["Koch"], task="positive"), atol=1e-6, rtol=0)
    assert second.tokens == int(deduped.tokenizer.tokenize(["Data Analyst", "Chef", "Koch"]).lengths.sum())
