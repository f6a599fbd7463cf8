"""The ASGI application: routes, API key, body limits, readiness and metrics around the queue."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobbert_onnx.runtime import Encoder
from jobbert_onnx.runtime.tokenize import Tokenized
from jobbert_onnx.serve.api import ApiError, parse_request, response_body
from jobbert_onnx.serve.config import ServeConfig
from jobbert_onnx.serve.metrics import CONTENT_TYPE, Metrics
from jobbert_onnx.serve.openapi import openapi
from jobbert_onnx.serve.queue import BatchQueue, QueueFull, VectorCache, encoding_thread

log = logging.getLogger("jobbert_onnx.serve")


class _Server:
    """State shared by the routes of one process."""

    def __init__(self, encoder: Encoder, config: ServeConfig, warmed: bool, encode_thread: ThreadPoolExecutor) -> None:
        self.encoder = encoder
        self.config = config
        self.max_batch_texts, self.max_batch_tokens = config.batch_limits(encoder.device.kind)
        self.encode_thread = encode_thread
        self.metrics = Metrics(encoder.max_seq_length)
        self.ready = False
        self._warmed = warmed
        self.queue: BatchQueue | None = None
        self._api_key = config.api_key.encode() if config.api_key else None
        self._spec = orjson.dumps(
            openapi(
                config.served_model_name,
                encoder.get_sentence_embedding_dimension(),
                config.max_inputs,
                encoder.max_seq_length,
            )
        )

    # -- routes ------------------------------------------------------------
    async def embeddings(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            self._authorize(request)
            if not self.ready or self.queue is None:
                raise ApiError(
                    503, "the model is still warming up; retry shortly", code="not_ready", headers={"Retry-After": "1"}
                )
            body = await self._read_body(request)
            parsed = parse_request(
                body,
                routes=self.encoder.tasks,
                default_route=self.encoder.default_task,
                served_model=self.config.served_model_name,
                dimensions=self.encoder.get_sentence_embedding_dimension(),
                max_inputs=self.config.max_inputs,
                max_chars=self.config.max_chars,
            )
            if self.config.log_texts:
                log.info("embedding %d text(s) with %s: %r", len(parsed.texts), parsed.route, parsed.texts)
            try:
                embedded = await self.queue.embed(parsed.texts, parsed.route)
            except QueueFull as full:
                raise ApiError(
                    503,
                    str(full),
                    code="server_overloaded",
                    error_type="server_error",
                    headers={"Retry-After": str(full.retry_after_s)},
                ) from None
            self.metrics.texts.labels(parsed.route).inc(len(parsed.texts))
            content = response_body(parsed, embedded.vectors, embedded.tokens)
            return Response(content, media_type="application/json")
        except ApiError as error:
            return Response(
                error.body(), status_code=error.status, media_type="application/json", headers=error.headers
            )
        finally:
            self.metrics.latency.observe(time.perf_counter() - started)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as error:
            return Response(
                error.body(), status_code=error.status, media_type="application/json", headers=error.headers
            )
        model = {"id": self.config.served_model_name, "object": "model", "created": 0, "owned_by": "jobbert-onnx"}
        return JSONResponse({"object": "list", "data": [model]})

    async def health(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def ready_check(self, request: Request) -> Response:
        if self.ready:
            return PlainTextResponse("ready\n")
        return PlainTextResponse("warming up\n", status_code=503, headers={"Retry-After": "1"})

    async def metrics_page(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def spec(self, request: Request) -> Response:
        return Response(self._spec, media_type="application/json")

    # -- helpers -----------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes as long for any wrong key of a given length as for another
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._api_key):
            raise ApiError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit}: send fewer texts")
        chunks: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"the request body exceeds {limit} bytes: send fewer texts")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.config.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.config.body_timeout_s:g} s") from None
        return b"".join(chunks)

    # -- life cycle --------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        config = self.config
        self.queue = BatchQueue(
            self.encoder,
            max_texts=self.max_batch_texts,
            max_tokens=self.max_batch_tokens,
            max_wait_s=config.max_wait_ms / 1000,
            max_queued=config.max_queue_texts,
            on_batch=self.metrics.observe_batch,
            on_depth=self.metrics.queue_texts.set,
            encode_thread=self.encode_thread,
            cache=VectorCache(config.cache_size) if config.cache_size else None,
            on_cache=self.metrics.observe_cache,
        )
        self.queue.start()
        warming = asyncio.get_running_loop().create_task(self._warm_up(), name="warm-up")
        try:
            yield
        finally:
            warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warming
            await self.queue.close()

    async def _warm_up(self) -> None:
        started = time.perf_counter()
        if not self._warmed:  # on the thread that will encode: buffers and CUDA graphs are per thread
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.encode_thread, warm_up, self.encoder, self.max_batch_texts)
        self.ready = True
        self.metrics.ready.set(1)
        log.info("ready: every length bucket ran once (%.1f s)", time.perf_counter() - started)


def warm_up(encoder: Encoder, max_rows: int) -> None:
    """Run every (head, length bucket) once at one row and at a full batch (with CUDA graphs, at
    every row count a batch is rounded to), so no request pays first-run costs.

    Call it on the thread that will encode: buffers, and CUDA graphs, are kept per thread.
    """
    long = encoder.tokenizer.tokenize(["warm " * (4 * encoder.max_seq_length)]).ids[0]
    lengths = encoder.tuning.buckets or (encoder.max_seq_length,)
    heights = {1, max_rows}
    if encoder.tuning.cuda_graphs:
        heights |= {1 << n for n in range(max_rows.bit_length()) if 1 << n <= max_rows}
    for route in encoder.tasks:
        for length in lengths:
            row = [*long[: length - 1], long[-1]]
            for rows in sorted(heights):
                # distinct rows (one token differs), or the encoder's dedup would run just one
                ids = [[row[0], 5 + n, *row[2:]] if len(row) > 2 else row for n in range(rows)]
                tokenized = Tokenized(ids=ids, lengths=np.full(rows, len(row), dtype=np.int64))
                encoder.encode_tokenized(tokenized, route, max_rows)


class _CountRequests:
    """ASGI middleware: counts every HTTP response by path and status code."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.observe_request(scope["path"], status)


async def _http_error(request: Request, error: Exception) -> Response:
    status = error.status_code if isinstance(error, HTTPException) else 500
    headers = dict(error.headers or {}) if isinstance(error, HTTPException) else {}
    allowed = headers.get("Allow", "")
    message = {
        404: f"no route {request.url.path}; see GET /openapi.json",
        405: f"{request.method} is not allowed on {request.url.path}; use {allowed or 'another method'}",
    }.get(status, "request failed")
    body = ApiError(status, message).body()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def _internal_error(request: Request, error: Exception) -> Response:
    log.exception("internal error on %s", request.url.path, exc_info=error)
    body = ApiError(500, "internal server error; see the server log", error_type="server_error").body()
    return Response(body, status_code=500, media_type="application/json")


def build_app(
    encoder: Encoder, config: ServeConfig, warmed: bool = False, encode_thread: ThreadPoolExecutor | None = None
) -> Any:
    """The ASGI app serving `encoder` under `config` (the queue starts with the app's lifespan;
    `warmed`: `warm_up` already ran on `encode_thread`, so it is ready at once)."""
    if warmed and encode_thread is None:
        raise ValueError("warmed=True needs the encode_thread the warm-up ran on")
    server = _Server(encoder, config, warmed, encode_thread or encoding_thread())
    routes = [
        Route("/v1/embeddings", server.embeddings, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/ready", server.ready_check, methods=["GET"]),
        Route("/metrics", server.metrics_page, methods=["GET"]),
        Route("/openapi.json", server.spec, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=server.lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )
    return _CountRequests(app, server.metrics)
