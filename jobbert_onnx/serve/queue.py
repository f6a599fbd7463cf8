"""Dynamic batching: concurrent requests become device batches, and the vectors go back.

A request is admitted only if the queue has room for all its texts (else
`QueueFull`: the server answers 503 and the client retries), tokenized in a
thread (the token counts size the batches and the usage), then waits in FIFO
order. One loop takes the oldest request's head, fills a batch with the
waiting texts of that head (whole requests or parts of large ones) up to
`max_texts` and `max_tokens`, waiting at most `max_wait_s` for more to arrive,
and runs it on the encoder in a thread while new requests queue up.

A text's vector does not depend on its batch beyond floating-point rounding:
padding is masked, and the encoder plans buckets as `Encoder.encode` does. Texts
that tokenize alike are encoded once per device batch (the encoder's dedup), and
with a `VectorCache` a text seen before is answered without queueing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from jobbert_onnx.runtime import Encoder
from jobbert_onnx.runtime.tokenize import Tokenized


class QueueFull(RuntimeError):
    """The queue cannot take this request now; retry after `retry_after_s`."""

    def __init__(self, queued: int, limit: int, retry_after_s: int) -> None:
        super().__init__(
            f"the server is at capacity ({queued} texts queued, limit {limit}); retry after {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


@dataclass
class Embedded:
    """What a request gets back: one vector per text, and the tokens the model read."""

    vectors: np.ndarray
    tokens: int


@dataclass(eq=False)
class _Request:
    route: str
    tokenized: Tokenized
    future: asyncio.Future[Embedded]
    vectors: np.ndarray
    taken: int = 0  # rows put into batches so far
    done: int = 0  # rows with vectors
    arrived: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return len(self.tokenized.ids)


@dataclass(frozen=True)
class _Slice:
    request: _Request
    start: int
    stop: int


# Observer hooks (metrics): batch size in texts, and queue depth in texts; cache hits and misses.
BatchObserver = Callable[[int, int], None]
DepthObserver = Callable[[int], None]
CacheObserver = Callable[[int, int], None]
_CacheKey = tuple[str, tuple[int, ...]]


class VectorCache:
    """A bounded LRU of vectors keyed by (head, token ids): texts the model reads alike share
    an entry. Used from the event loop's thread only."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._vectors: OrderedDict[_CacheKey, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._vectors)

    def get(self, key: _CacheKey) -> np.ndarray | None:
        vector = self._vectors.get(key)
        if vector is not None:
            self._vectors.move_to_end(key)
        return vector

    def put(self, key: _CacheKey, vector: np.ndarray) -> None:
        self._vectors[key] = vector
        self._vectors.move_to_end(key)
        while len(self._vectors) > self.size:
            self._vectors.popitem(last=False)


def encoding_thread() -> ThreadPoolExecutor:
    """The single thread an encoder runs on in the server."""
    return ThreadPoolExecutor(1, thread_name_prefix="encode")


class BatchQueue:
    """Merges concurrent `embed` calls into batches for one encoder."""

    def __init__(
        self,
        encoder: Encoder,
        *,
        max_texts: int,
        max_tokens: int,
        max_wait_s: float,
        max_queued: int,
        on_batch: BatchObserver | None = None,
        on_depth: DepthObserver | None = None,
        encode_thread: ThreadPoolExecutor | None = None,
        cache: VectorCache | None = None,
        on_cache: CacheObserver | None = None,
    ) -> None:
        """`encode_thread`: the one thread that runs the encoder (per-thread buffers and CUDA
        graphs live there, so whoever warms the encoder up must use it too); default: a new one.
        `cache`: vectors of texts seen before, answered without queueing; `on_cache` hears
        (hits, misses) per request."""
        self.encoder = encoder
        self.max_texts = max_texts
        self.max_tokens = max_tokens
        self.max_wait_s = max_wait_s
        self.max_queued = max_queued
        self._on_batch = on_batch or (lambda texts, tokens: None)
        self._on_depth = on_depth or (lambda depth: None)
        self._waiting: deque[_Request] = deque()
        self._queued = 0
        self._arrival = asyncio.Event()
        self._tokenize_pool = ThreadPoolExecutor(2, thread_name_prefix="tokenize")
        self._run_pool = encode_thread or encoding_thread()
        self._loop_task: asyncio.Task[None] | None = None
        self._texts_per_second = 0.0
        self._cache = cache
        self._on_cache = on_cache or (lambda hits, misses: None)

    @property
    def queued(self) -> int:
        """Texts admitted and not yet answered."""
        return self._queued

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop(), name="batch-loop")

    async def close(self) -> None:
        """Stop the loop (after the server has finished its in-flight requests)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for request in self._waiting:
            if not request.future.done():
                request.future.set_exception(RuntimeError("the server is shutting down"))
        self._waiting.clear()
        self._tokenize_pool.shutdown(wait=True)
        self._run_pool.shutdown(wait=True)

    async def embed(self, texts: list[str], route: str) -> Embedded:
        """Vectors for `texts` through head `route`, batched with whatever else is waiting.

        Raises:
            QueueFull: Admitting these texts would exceed `max_queued`.
        """
        if self._loop_task is None or self._loop_task.done():
            raise RuntimeError("the batch loop is not running")
        if self._queued + len(texts) > self.max_queued:
            raise QueueFull(self._queued, self.max_queued, self._retry_after(len(texts)))
        self._admit(len(texts))
        try:
            loop = asyncio.get_running_loop()
            tokenized = await loop.run_in_executor(self._tokenize_pool, self.encoder.tokenizer.tokenize, texts)
            if self._cache is None:
                return await self._enqueue(tokenized, route)
            return await self._through_cache(self._cache, tokenized, route)
        finally:
            self._admit(-len(texts))

    async def _enqueue(self, tokenized: Tokenized, route: str) -> Embedded:
        request = _Request(
            route=route,
            tokenized=tokenized,
            future=asyncio.get_running_loop().create_future(),
            vectors=np.empty((len(tokenized.ids), self.encoder.get_sentence_embedding_dimension()), dtype=np.float32),
        )
        self._waiting.append(request)
        self._arrival.set()
        return await request.future

    async def _through_cache(self, cache: VectorCache, tokenized: Tokenized, route: str) -> Embedded:
        """Vectors from the cache where it has them; the rest queued, then cached."""
        keys = [(route, tuple(row)) for row in tokenized.ids]
        found = [cache.get(key) for key in keys]
        missing = [row for row, vector in enumerate(found) if vector is None]
        self._on_cache(len(keys) - len(missing), len(missing))
        tokens = int(tokenized.lengths.sum())
        vectors = np.empty((len(keys), self.encoder.get_sentence_embedding_dimension()), dtype=np.float32)
        if missing:
            rest = Tokenized(ids=[tokenized.ids[row] for row in missing], lengths=tokenized.lengths[missing])
            encoded = (await self._enqueue(rest, route)).vectors
            vectors[missing] = encoded
            for at, row in enumerate(missing):
                cache.put(keys[row], encoded[at].copy())
        for row, vector in enumerate(found):
            if vector is not None:
                vectors[row] = vector
        return Embedded(vectors=vectors, tokens=tokens)

    def _admit(self, texts: int) -> None:
        self._queued += texts
        self._on_depth(self._queued)

    def _retry_after(self, texts: int) -> int:
        """Seconds until the queue has likely drained enough (at least 1)."""
        rate = self._texts_per_second
        if rate <= 0:
            return 1
        return max(1, min(60, int(np.ceil((self._queued + texts - self.max_queued) / rate))))

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._arrival.clear()
                await self._arrival.wait()
            await self._gather_more()
            slices = self._take_batch()
            if not slices:
                continue
            route = slices[0].request.route
            tokenized = _concat(slices)
            started = time.monotonic()
            try:
                vectors = await loop.run_in_executor(
                    self._run_pool, self.encoder.encode_tokenized, tokenized, route, self.max_texts
                )
            except Exception as error:  # the requests in this batch fail; the server goes on
                for piece in slices:
                    if not piece.request.future.done():
                        piece.request.future.set_exception(error)
                continue
            elapsed = max(time.monotonic() - started, 1e-6)
            self._texts_per_second = 0.8 * self._texts_per_second + 0.2 * (len(tokenized.ids) / elapsed)
            self._on_batch(len(tokenized.ids), int(tokenized.lengths.sum()))
            _scatter(slices, vectors)

    async def _gather_more(self) -> None:
        """Wait (up to max_wait_s from the oldest arrival) while the next batch is not full."""
        oldest = self._waiting[0]
        deadline = oldest.arrived + self.max_wait_s
        while True:
            texts, tokens = self._pending_for(oldest.route)
            remaining = deadline - time.monotonic()
            if texts >= self.max_texts or tokens >= self.max_tokens or remaining <= 0:
                return
            self._arrival.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrival.wait(), remaining)

    def _pending_for(self, route: str) -> tuple[int, int]:
        texts = tokens = 0
        for request in self._waiting:
            if request.route == route:
                texts += request.size - request.taken
                tokens += int(request.tokenized.lengths[request.taken :].sum())
        return texts, tokens

    def _take_batch(self) -> list[_Slice]:
        """The next batch: waiting texts of the oldest request's head, in arrival order."""
        route = self._waiting[0].route
        slices: list[_Slice] = []
        texts = tokens = 0
        for request in list(self._waiting):
            if request.route != route:
                continue
            if request.future.done():  # cancelled by its client
                self._waiting.remove(request)
                continue
            start = stop = request.taken
            lengths = request.tokenized.lengths
            while stop < request.size and texts < self.max_texts:
                length = int(lengths[stop])
                if texts and tokens + length > self.max_tokens:
                    break
                texts += 1
                tokens += length
                stop += 1
            if stop > start:
                slices.append(_Slice(request, start, stop))
                request.taken = stop
            if request.taken == request.size:
                self._waiting.remove(request)
            if texts >= self.max_texts or stop < request.size:
                break
        return slices


def _concat(slices: list[_Slice]) -> Tokenized:
    ids: list[list[int]] = []
    for piece in slices:
        ids.extend(piece.request.tokenized.ids[piece.start : piece.stop])
    lengths = np.concatenate([piece.request.tokenized.lengths[piece.start : piece.stop] for piece in slices])
    return Tokenized(ids=ids, lengths=lengths)


def _scatter(slices: list[_Slice], vectors: np.ndarray) -> None:
    offset = 0
    for piece in slices:
        count = piece.stop - piece.start
        request = piece.request
        request.vectors[piece.start : piece.stop] = vectors[offset : offset + count]
        offset += count
        request.done += count
        if request.done == request.size and not request.future.done():
            tokens = int(request.tokenized.lengths.sum())
            request.future.set_result(Embedded(vectors=request.vectors, tokens=tokens))
