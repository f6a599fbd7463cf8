"""What a server process needs to know: the model, where it runs, and its limits."""

from __future__ import annotations

from dataclasses import dataclass, replace

from jobbert_onnx.errors import UsageError

# Header and environment variable for the API key (the flag wins over the variable).
API_KEY_ENV = "JOBBERT_ONNX_API_KEY"
# Device batches where --max-batch-texts and --max-batch-tokens are not given: small on the
# CPU, where a batch's latency grows with its size; large on CUDA, as in `Tuning`'s budget.
BATCH_LIMITS = {"cpu": (64, 16384), "cuda": (2048, 32768)}


@dataclass(frozen=True)
class ServeConfig:
    """One server's settings; every limit has a safe default.

    Attributes:
        model_dir: The export folder.
        host: Address to bind (loopback by default: expose it on purpose).
        port: TCP port (0: any free one, printed at start-up).
        devices: One device per worker group, e.g. ``("cuda:0", "cuda:1")``.
        workers: Processes per device (all share the port).
        precision: Encoder variant (default: the fastest for the device).
        threads: onnxruntime threads per graph (default: the cores shared by the workers).
        served_model_name: The ``model`` name clients send and get back.
        api_key: When set, `/v1/*` requires ``Authorization: Bearer <key>``.
        max_batch_texts: Most texts in one device batch (default: 64 on the CPU, 2,048 on CUDA).
        max_batch_tokens: Most tokens (summed lengths) in one device batch (default: 16,384 on
            the CPU, 32,768 on CUDA).
        max_wait_ms: How long a batch waits for more requests before it runs.
        max_inputs: Most texts in one request.
        max_chars: Longer texts are cut to this many characters before tokenizing
            (the model reads only its first max_seq_length tokens anyway).
        max_body_bytes: Larger request bodies get 413.
        max_queue_texts: Texts admitted and not yet answered; beyond it, 503 with Retry-After.
        body_timeout_s: A request body that takes longer to arrive gets 408.
        cache_size: Vectors kept in an LRU cache keyed by (task, token ids); 0 turns it off.
        log_texts: Log request texts (off: only counts are logged).
        verify: Check the sha256 of the model files at start-up.
    """

    model_dir: str
    host: str = "127.0.0.1"
    port: int = 8080
    devices: tuple[str, ...] = ("auto",)
    workers: int = 1
    precision: str | None = None
    threads: int | None = None
    served_model_name: str = "jobbert-v3"
    api_key: str | None = None
    max_batch_texts: int | None = None
    max_batch_tokens: int | None = None
    max_wait_ms: float = 2.0
    max_inputs: int = 2048
    max_chars: int = 4096
    max_body_bytes: int = 16 * 1024 * 1024
    max_queue_texts: int = 8192
    body_timeout_s: float = 30.0
    cache_size: int = 0
    log_texts: bool = False
    verify: bool = True

    def check(self) -> ServeConfig:
        """Return self, or raise UsageError naming the setting to fix."""
        positive = {
            "workers": self.workers,
            "max_batch_texts": self.max_batch_texts,
            "max_batch_tokens": self.max_batch_tokens,
            "max_inputs": self.max_inputs,
            "max_chars": self.max_chars,
            "max_body_bytes": self.max_body_bytes,
            "max_queue_texts": self.max_queue_texts,
        }
        for name, value in positive.items():
            if value is None and name.startswith("max_batch_"):
                continue  # the device's default (`batch_limits`)
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer; got {value}")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be in [0, 65535]; got {self.port}")
        if self.max_wait_ms < 0 or self.body_timeout_s <= 0:
            raise UsageError("--max-wait-ms must be >= 0 and --body-timeout-s > 0")
        if self.max_queue_texts < self.max_inputs:
            raise UsageError(
                f"--max-queue-texts ({self.max_queue_texts}) must be at least --max-inputs ({self.max_inputs}), "
                "or a full-size request could never be admitted"
            )
        if self.cache_size < 0:
            raise UsageError(f"--cache-size must be 0 (no cache) or more; got {self.cache_size}")
        if not self.devices:
            raise UsageError("--device needs at least one device")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError(f"the API key is empty; pass a real key or unset {API_KEY_ENV}")
        return self

    def check_model(self, max_seq_length: int) -> ServeConfig:
        """Return self, or raise UsageError where a limit cannot hold one text of the model's
        `max_seq_length` (from its manifest)."""
        if self.max_batch_tokens is not None and self.max_batch_tokens < max_seq_length:
            raise UsageError(
                f"--max-batch-tokens must hold one {max_seq_length}-token text (this model's max_seq_length); "
                f"got {self.max_batch_tokens}"
            )
        return self

    def batch_limits(self, kind: str) -> tuple[int, int]:
        """(most texts, most tokens) per device batch on a ``cpu`` or ``cuda`` device: the values
        given, else the device's defaults (`BATCH_LIMITS`)."""
        texts, tokens = BATCH_LIMITS["cuda" if kind == "cuda" else "cpu"]
        return self.max_batch_texts or texts, self.max_batch_tokens or tokens

    def for_worker(self, device: str, threads: int | None) -> ServeConfig:
        """This config for one worker process on one device."""
        return replace(self, devices=(device,), workers=1, threads=threads)
