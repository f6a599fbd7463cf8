"""Prometheus metrics of one server, summed over its worker processes when there are several.

With several workers the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before
they start, each writes its counters there, and whichever worker answers
``GET /metrics`` reports the sum (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Paths reported by name; anything else is "other" (bounded label values).
KNOWN_PATHS = ("/v1/embeddings", "/v1/models", "/health", "/ready", "/metrics", "/openapi.json")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """The server's counters, histograms and gauges."""

    def __init__(self, max_seq_length: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "jobbert_requests",
            "HTTP requests by path and status code.",
            ["path", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "jobbert_request_duration_seconds",
            "Time from request to response of POST /v1/embeddings.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_texts = Histogram(
            "jobbert_batch_texts",
            "Texts per device batch.",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_texts = Gauge(
            "jobbert_queue_texts",
            "Texts admitted and not yet answered.",
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.tokens = Counter(
            "jobbert_tokens",
            f"Tokens run through the encoder (after truncation to the model's {max_seq_length}).",
            registry=self.registry,
        )
        self.texts = Counter(
            "jobbert_texts",
            "Texts embedded, by head.",
            ["input_type"],
            registry=self.registry,
        )
        self.cache = Counter(
            "jobbert_cache_lookups",
            "Texts looked up in the vector cache (--cache-size), by result: hit or miss.",
            ["result"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "jobbert_ready",
            "1 once the model is loaded and warmed.",
            multiprocess_mode="livemin",
            registry=self.registry,
        )

    def observe_request(self, path: str, code: int) -> None:
        self.requests.labels(path if path in KNOWN_PATHS else "other", str(code)).inc()

    def observe_batch(self, texts: int, tokens: int) -> None:
        self.batch_texts.observe(texts)
        self.tokens.inc(tokens)

    def observe_cache(self, hits: int, misses: int) -> None:
        self.cache.labels("hit").inc(hits)
        self.cache.labels("miss").inc(misses)

    def render(self) -> bytes:
        if _multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
