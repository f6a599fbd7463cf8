"""`Tuning`: how the runtime batches and runs, beyond device and precision.

Every field left at None takes its device's default, and those defaults are
decided here and nowhere else (`Tuning.resolve`). `Encoder.load` takes one
`Tuning`; the everyday call needs none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from jobbert_onnx.errors import UsageError
from jobbert_onnx.runtime.batching import check_buckets

# Length buckets: batches never cross one. On CUDA batches are also padded to their
# bucket (few shapes for the kernels and CUDA graphs); on the CPU only to their longest
# row, and finer buckets cut padding further. Large title batches without buckets ran at
# a quarter of the speed (studies/HISTORY.md). CUDA's steps of 2 up to 16 pad 50,000 real
# titles (8.3 tokens on average, genuine XLM-R tokenizer) to 1.08x their tokens, where
# (8, 16, 32, 64) padded them to 1.38x.
CUDA_BUCKETS = (6, 8, 10, 12, 14, 16, 20, 24, 32, 48, 64)
CPU_BUCKETS = (8, 12, 16, 24, 32, 48, 64)
# Rows per batch where a call names none: sentence-transformers' 32 on the CPU; on CUDA
# large batches, whose size the token budget decides (4,096 titles of 8 tokens, 512 skill
# lists of 64).
CPU_BATCH_SIZE = 32
CUDA_BATCH_SIZE = 4096
CUDA_TOKEN_BUDGET = 32768
# Batches of one call in flight on CUDA: one computes while the next copies in and launches.
CUDA_IN_FLIGHT = 2
# Batches of more padded tokens than this (512 full-length skill lists) run with buffers
# the sessions allocate, and the call ends by shrinking onnxruntime's memory arenas
# (studies/HISTORY.md). A token budget above it raises it to the budget: batches the
# budget allows never shrink the arenas after every call.
SHRINK_ABOVE_TOKENS = 32768


@dataclass(frozen=True)
class Tuning:
    """Batching and run options; None means "the default for the device" (see `resolve`).

    Attributes:
        buckets: Length buckets no batch crosses; ``()`` for none (batches of `batch_size`,
            longest first). Default: (6, 8, 10, 12, 14, 16, 20, 24, 32, 48, 64) on CUDA,
            (8, 12, 16, 24, 32, 48, 64) on the CPU.
        batch_size: Most rows per batch where a call (`encode`'s `batch_size`) names none.
            Default: 32 on the CPU; 4,096 on CUDA, where `token_budget` decides.
        token_budget: Most padded tokens (rows x length) per batch, whatever the batch size.
            Default: 32,768 on CUDA (4,096 titles or 512 skill lists); no cap on the CPU.
        overlap: Tokenize the next batches in a thread while the device runs the current one.
            Default: on for CUDA; off on the CPU, where the thread would take a core from the
            graphs. Either way only calls of two batches or more start the thread.
        in_flight: Batches of one call run at once, each on a run thread of its own: while one
            computes, the next copies in and launches. Default: 2 on CUDA; 1 on the CPU, where
            onnxruntime's threads already take every core. With CUDA graphs runs take turns, so 1.
        pad_to_bucket: Pad batches to their bucket's length, not their longest row. Default: on
            for CUDA, where fewer shapes pay; off on the CPU, where every padded token costs time.
        reuse_buffers: Keep device buffers and IO bindings per batch shape and update them in
            place. Default: on for CUDA.
        cuda_graphs: Capture one CUDA graph per batch shape and replay it (CUDA only). Batch
            rows are rounded up to a power of two, so few shapes arise; at most `MAX_CUDA_GRAPHS`
            shapes are captured. Default: off.
        merged: Run the export's merged graph (encoder, pooling and every head in one graph,
            written by ``export --merged``): one run per batch instead of three. Default: on
            for CUDA where the export has it, else the chained graphs; True where the export
            has none is an error.
        packed: Run the fp16 encoder that computes on real tokens only (``export --packed``:
            RemovePadding and PackedAttention, CUDA kernels only), chained with pooling and the
            head. Default: off (the GPU proof measures it against the padded encoder). An error
            on the CPU, where an export lacks it, or together with ``merged=True``.
        host_output: A batch's vectors land in a host buffer kept with its shape's buffers
            (page-locked on CUDA, so the copy off the device is one DMA, not the driver's
            staged copy), and the run thread copies them straight into the call's result: no
            array per batch. Needs `reuse_buffers` (on by default on CUDA; turned on by this on
            the CPU); not with CUDA graphs. Default: off (the GPU proof measures it).
        dedup: Encode each distinct text of a call once and copy its vector to the repeats
            (`encode` compares the texts, `encode_tokenized` the token ids); the vectors are the
            same either way. Default: on (HR data repeats itself; on all-distinct input the
            check costs well under 1%, studies/HISTORY.md).
        spinning: Let onnxruntime's idle threads spin for work. Default: off (spinning threads
            of one chained session slow the next one down; studies/HISTORY.md).
        shrink_above_tokens: A batch of more padded tokens runs with buffers the sessions
            allocate, and the call then shrinks onnxruntime's memory arenas once and returns
            freed heap pages to the OS, so one huge batch does not hold its memory for the life
            of the process. ``0`` never shrinks. Default: 32,768, or `token_budget` where that
            is larger. With CUDA graphs arenas never shrink (captured graphs keep using their memory).
    """

    buckets: tuple[int, ...] | None = None
    batch_size: int | None = None
    token_budget: int | None = None
    overlap: bool | None = None
    in_flight: int | None = None
    pad_to_bucket: bool | None = None
    reuse_buffers: bool | None = None
    cuda_graphs: bool | None = None
    spinning: bool | None = None
    shrink_above_tokens: int | None = None
    merged: bool | None = None
    packed: bool | None = None
    dedup: bool | None = None
    host_output: bool | None = None

    def resolve(self, device_kind: str, max_seq_length: int) -> Tuning:
        """A copy with every default filled in for ``cpu`` or ``cuda``, checked.

        Raises:
            UsageError: A value is out of range, or options contradict each other
                (CUDA graphs on the CPU, or without buckets); the message names the fix.
        """
        on_cuda = device_kind == "cuda"
        cuda_graphs = bool(self.cuda_graphs)
        if cuda_graphs and not on_cuda:
            raise UsageError("cuda_graphs=True needs device='cuda'; CUDA graphs do not exist on the CPU")
        buckets = self.buckets
        if buckets is None:
            buckets = CUDA_BUCKETS if on_cuda else CPU_BUCKETS
        if not isinstance(buckets, Sequence) or isinstance(buckets, str):
            raise UsageError(f"buckets must be a list of lengths, () for none, or None for the default: {buckets!r}")
        buckets = check_buckets(buckets, max_seq_length) if buckets else ()
        if cuda_graphs and not buckets:
            raise UsageError("cuda_graphs=True needs length buckets (one graph per shape); leave buckets at None")
        for name, least in (("batch_size", 1), ("token_budget", 1), ("in_flight", 1), ("shrink_above_tokens", 0)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                what = "a positive integer" if least else "a positive integer (0: never)"
                raise UsageError(f"{name} must be {what} or None for the default; got {value!r}")
        host_output = bool(self.host_output)
        if host_output and cuda_graphs:
            raise UsageError(
                "host_output=True and cuda_graphs=True exclude each other: a captured graph cannot copy "
                "into host memory; drop one"
            )
        if host_output and self.reuse_buffers is False:
            raise UsageError("host_output=True keeps its host buffers with the reused ones: drop reuse_buffers=False")
        budget = self.token_budget
        if budget is None and on_cuda:
            budget = CUDA_TOKEN_BUDGET
        shrink = self.shrink_above_tokens
        if shrink is None:
            shrink = max(SHRINK_ABOVE_TOKENS, budget or 0)
        return replace(
            self,
            buckets=buckets,
            batch_size=self.batch_size or (CUDA_BATCH_SIZE if on_cuda else CPU_BATCH_SIZE),
            token_budget=budget,
            overlap=on_cuda if self.overlap is None else bool(self.overlap),
            in_flight=1 if cuda_graphs else (self.in_flight or (CUDA_IN_FLIGHT if on_cuda else 1)),
            pad_to_bucket=cuda_graphs or (on_cuda if self.pad_to_bucket is None else bool(self.pad_to_bucket)),
            reuse_buffers=cuda_graphs
            or host_output
            or (on_cuda if self.reuse_buffers is None else bool(self.reuse_buffers)),
            cuda_graphs=cuda_graphs,
            spinning=bool(self.spinning),
            shrink_above_tokens=shrink,
            dedup=True if self.dedup is None else bool(self.dedup),
            host_output=host_output,
        )

    @classmethod
    def from_options(cls, options: dict[str, object]) -> Tuning:
        """A `Tuning` from keyword options (as in a benchmark's configuration), refusing unknown names."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UsageError(f"unknown tuning option {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(options)
        if isinstance(values.get("buckets"), list):
            values["buckets"] = tuple(values["buckets"])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]
