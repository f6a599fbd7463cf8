"""`Encoder` on an export folder: a drop-in for `SentenceTransformer.encode(..., task=...)`.

`jobbert_onnx.Encoder` (in `jobbert_onnx.loading`) adds loading by hub id or
sentence-transformers folder."""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from jobbert_onnx.errors import UsageError, WrongTypeError
from jobbert_onnx.manifest import (
    POOLING_FILE,
    TOKENIZER_FILE,
    Manifest,
    Variant,
    head_file,
    read_manifest,
    route_for,
)
from jobbert_onnx.runtime.batching import BatchPlan, plan_batches
from jobbert_onnx.runtime.chain import GraphChain, encoder_graph, uses_merged
from jobbert_onnx.runtime.memory import trim_heap
from jobbert_onnx.runtime.prefetch import prefetch
from jobbert_onnx.runtime.progress import Progress
from jobbert_onnx.runtime.sessions import Device, choose_device
from jobbert_onnx.runtime.tokenize import Batch, TextTokenizer, Tokenized
from jobbert_onnx.runtime.tuning import Tuning
from jobbert_onnx.vectors import cosine_matrix, normalize

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations only, so 3.10 runs this

# Texts tokenized together; batches are formed (longest first) within such a chunk.
TOKENIZE_CHUNK = 8192
_Key = TypeVar("_Key", bound=Hashable)


def distinct(items: list[_Key]) -> tuple[list[_Key], np.ndarray | None]:
    """The distinct items in order of first appearance, and for every item the index of its
    distinct one; None instead of the index when all are distinct (nothing to copy back)."""
    index: dict[_Key, int] = {}
    positions = np.fromiter((index.setdefault(item, len(index)) for item in items), dtype=np.intp, count=len(items))
    if len(index) == len(items):
        return items, None
    return list(index), positions


def check_texts(sentences: object) -> tuple[list[str], bool]:
    """Validate the input of `encode`; return the texts and whether one string was given.

    Raises:
        TypeError: Not a string or a list/tuple of strings; names the first bad item.
        ValueError: A string holds a lone surrogate; names it.
    """
    if isinstance(sentences, str):
        _check_unicode(sentences, 0)
        return [sentences], True
    if not isinstance(sentences, (list, tuple)):
        hint = " (convert it with .tolist())" if type(sentences).__name__ == "ndarray" else ""
        raise WrongTypeError(f"sentences must be a str or a list of str; got {type(sentences).__name__}{hint}")
    for index, item in enumerate(sentences):
        if not isinstance(item, str):
            raise WrongTypeError(f"sentences[{index}] is {type(item).__name__}, not str; every item must be a string")
        if not item.isascii():
            _check_unicode(item, index)
    return list(sentences), False


def _check_unicode(text: str, index: int) -> None:
    """Refuse lone surrogates (text decoded with errors='surrogateescape', or broken JSON escapes):
    they are not Unicode, and the tokenizer cannot read them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UsageError(
            f"sentences[{index}] holds a lone surrogate {text[error.start]!r} at character {error.start}, "
            "which is not valid Unicode; decode the source with errors='replace' or fix it"
        ) from None


_POOL_LOCK = threading.Lock()


class _Seen:
    """What a call's batches held: padded tokens in all, and whether one was huge."""

    def __init__(self) -> None:
        self.padded_tokens = 0
        self.huge = False

    def count(
        self, batches: Iterator[tuple[np.ndarray, Batch]], is_huge: Callable[[Batch], bool]
    ) -> Iterator[tuple[np.ndarray, Batch]]:
        for rows, batch in batches:
            self.padded_tokens += batch.input_ids.size
            self.huge = self.huge or is_huge(batch)
            yield rows, batch


class Encoder:
    """JobBERT-v3 from an export folder, on onnxruntime, without torch.

    Example:
        >>> enc = Encoder.load("jobbert-v3-onnx/", device="auto")
        >>> titles = enc.encode(["Software Engineer", "Produktmanager"], task="anchor")
        >>> titles.shape
        (2, 1024)

    `encode` is safe to call from several threads at once: onnxruntime sessions
    allow concurrent runs, and every thread keeps its own IO bindings and buffers
    (`Tuning.reuse_buffers` caches them per thread and batch shape). With CUDA graphs
    there is one set of buffers, since a captured graph replays fixed addresses, and
    runs take turns under a lock.
    """

    def __init__(self, manifest: Manifest, chain: GraphChain) -> None:
        self.manifest = manifest
        self.chain = chain
        self.device: Device = chain.device
        self.variant: Variant = chain.variant
        self.tuning: Tuning = chain.tuning
        self.tokenizer = TextTokenizer(manifest.path(TOKENIZER_FILE), manifest.max_seq_length)
        self._pool: ThreadPoolExecutor | None = None  # the run threads of `Tuning.in_flight`, made on first use

    @classmethod
    def load(
        cls,
        folder: str | Path,
        device: str = "auto",
        precision: str | None = None,
        threads: int | None = None,
        *,
        verify: bool = True,
        tuning: Tuning | None = None,
    ) -> Self:
        """Load an export folder (`jobbert_onnx.Encoder.load` also takes hub ids and
        sentence-transformers folders, exporting them once into a cache).

        Args:
            folder: An export folder written by `jobbert-onnx export`.
            device: ``"auto"`` (CUDA when it really loads, else the CPU, with a
                warning), ``"cuda"``, ``"cuda:N"`` or ``"cpu"``.
            precision: Encoder variant (``fp16``, ``fp32``, ``int8``); default: fp16 on
                CUDA, and on the CPU the fastest the export holds (int8, then fp32).
            threads: onnxruntime intra-op threads per graph (default: one per core).
            verify: Check the sha256 of every file this encoder loads against the manifest
                (about a second per GB); False skips it for the fastest start-up.
            tuning: Batching and run options (`Tuning`); fields left at None, and a None
                `tuning`, take the device's defaults.

        Raises:
            ManifestError: The folder is not a complete export, lacks `precision`, or a file
                does not match its sha256.
            DeviceError: ``device="cuda"`` and CUDA cannot be used here.
            UsageError: A `tuning` value is out of range or does not fit the device.
        """
        manifest = read_manifest(folder)
        resolved = choose_device(device, manifest.path(POOLING_FILE))
        variant = manifest.choose_variant(resolved.kind, precision)
        chosen = (tuning or Tuning()).resolve(resolved.kind, manifest.max_seq_length)
        if verify:
            graphs = [encoder_graph(chosen, variant, resolved), POOLING_FILE, *(head_file(r) for r in manifest.routes)]
            if uses_merged(chosen, variant, resolved):
                graphs = [str(variant.merged_file)]
            manifest.verify([*graphs, TOKENIZER_FILE])
        return cls(manifest, GraphChain(manifest, variant, resolved, chosen, threads))

    @property
    def tasks(self) -> tuple[str, ...]:
        """The heads of the model, e.g. ``("anchor", "positive")``."""
        return self.manifest.routes

    @property
    def default_task(self) -> str | None:
        """The head used when `task` is None (``anchor``: job titles); None where the model has no
        default and every call must name its task."""
        m = self.manifest
        return route_for(None, m.routes, m.default_route, m.task_routes, m.catch_all_route)

    @property
    def max_seq_length(self) -> int:
        return self.manifest.max_seq_length

    @property
    def precision(self) -> str:
        """The encoder variant in use: ``fp16``, ``fp32`` or ``int8``."""
        return self.variant.precision

    def get_sentence_embedding_dimension(self) -> int:
        """Size of the vectors (1024 for JobBERT-v3), as in sentence-transformers."""
        return self.manifest.output_dim

    def resolve_task(self, task: str | None) -> str:
        """The head for `task`, as sentence-transformers' Router routes text (`manifest.route_for`):
        a task the model maps goes where it maps it, others to the head of their name; None to the
        default. Errors name the valid tasks."""
        if task is not None and not isinstance(task, str):
            raise WrongTypeError(f"task must be a str or None; got {type(task).__name__}")
        m = self.manifest
        route = route_for(task, m.routes, m.default_route, m.task_routes, m.catch_all_route)
        if route is None and task is None:
            raise UsageError(f"this model has no default task; pass task= one of: {', '.join(self._task_names())}")
        if route is None:
            raise UsageError(f"unknown task {task!r}; this model has: {', '.join(self._task_names())}")
        return route

    def _task_names(self) -> list[str]:
        return [*self.tasks, *(task for task in self.manifest.task_routes if task not in self.tasks)]

    def encode(
        self,
        sentences: str | Sequence[str],
        task: str | None = None,
        batch_size: int | None = None,
        show_progress_bar: bool | None = False,
        normalize_embeddings: bool = False,
        *,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        precision: str = "float32",
        output_value: str | None = "sentence_embedding",
        truncate_dim: int | None = None,
        prompt: str | None = None,
        device: str | None = None,
    ) -> np.ndarray:
        """Embed job titles (``task="anchor"``) or skill lists (``task="positive"``).

        Follows `SentenceTransformer.encode` (sentence-transformers >= 5): texts are
        truncated to the model's 64 tokens, sorted by length into batches, and the
        vectors returned in input order.

        Args:
            sentences: One string, or a list/tuple of strings.
            task: ``"anchor"`` (job titles), ``"positive"`` (skill lists), or None
                for the model's default route (``anchor``).
            batch_size: Most texts per graph run; None: the device's default
                (`Tuning.batch_size`: 32 on the CPU, as in sentence-transformers; on CUDA as
                many as `Tuning.token_budget` allows). A token budget caps any batch size.
            show_progress_bar: Draw a progress bar on stderr.
            normalize_embeddings: Scale every vector to unit length.
            convert_to_numpy: Must stay True (vectors are numpy arrays).
            convert_to_tensor: Must stay False (this runtime does not use torch).
            precision: Only ``"float32"``.
            output_value: Only ``"sentence_embedding"``.
            truncate_dim: Keep the first N dimensions (before normalizing).
            prompt: Text put in front of every input, as sentence-transformers does.
            device: Accepted for compatibility; the device is chosen at `load`.

        Returns:
            float32 array [n, dim] for a list, or a 1-D [dim] vector for one string.

        Raises:
            TypeError: `sentences` is not a string or a list of strings.
            ValueError: Unknown task, an option this runtime does not support, or a text
                with a lone surrogate. Every input is checked before any is encoded.
        """
        texts, single = check_texts(sentences)
        route = self.resolve_task(task)
        _check_options(convert_to_numpy, convert_to_tensor, precision, output_value, device, self.device)
        batch_size = self._batch_size(batch_size)
        if truncate_dim is not None and not 1 <= truncate_dim <= self.get_sentence_embedding_dimension():
            raise UsageError(
                f"truncate_dim must be in [1, {self.get_sentence_embedding_dimension()}]; got {truncate_dim}"
            )
        if prompt:
            if not self.manifest.include_prompt:
                raise UsageError(
                    "this model pools without its prompt's tokens (include_prompt=false), which this runtime does not "
                    "do: encode without prompt="
                )
            texts = [prompt + text for text in texts]

        unique, repeats = distinct(texts) if self.tuning.dedup else (texts, None)
        progress = Progress(len(unique), bool(show_progress_bar))
        out = self._run(self._batches(unique, batch_size), len(unique), route, progress)
        if repeats is not None:
            out = out[repeats]

        if truncate_dim is not None:
            out = np.ascontiguousarray(out[:, :truncate_dim])
        if normalize_embeddings:
            out = normalize(out)
        return out[0] if single else out

    def encode_tokenized(
        self, tokenized: Tokenized, task: str | None = None, batch_size: int | None = None
    ) -> np.ndarray:
        """Vectors [n, dim] of texts already tokenized by ``self.tokenizer.tokenize``.

        For callers that need the token counts first, as the server does to size its
        batches and to report usage; batches are planned exactly as in `encode`.
        """
        route = self.resolve_task(task)
        batch_size = self._batch_size(batch_size)
        repeats = None
        if self.tuning.dedup:
            keys, repeats = distinct([tuple(row) for row in tokenized.ids])
            if repeats is not None:
                first = np.unique(repeats, return_index=True)[1]
                tokenized = Tokenized(ids=[list(key) for key in keys], lengths=tokenized.lengths[first])
        out = self._run(self._pad(tokenized, self._plans(tokenized, batch_size), 0), len(tokenized.ids), route)
        return out if repeats is None else out[repeats]

    def _batch_size(self, batch_size: int | None) -> int:
        if batch_size is None:
            return int(self.tuning.batch_size or 1)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise UsageError(
                f"batch_size must be a positive integer, or None for the device's default; got {batch_size!r}"
            )
        return batch_size

    def _run(
        self, batches: Iterator[tuple[np.ndarray, Batch]], count: int, route: str, progress: Progress | None = None
    ) -> np.ndarray:
        """Vectors [count, dim] in input order.

        After a call that ran a huge batch (`Tuning.shrink_above_tokens`), onnxruntime's
        arenas shrink once, and after a call of that many padded tokens in all, freed
        heap pages go back to the OS.
        """
        out = np.empty((count, self.get_sentence_embedding_dimension()), dtype=np.float32)
        seen = _Seen()
        for rows in self._in_flight(seen.count(batches, self.chain.is_huge), route, out):
            if progress is not None:
                progress.update(len(rows))
        if progress is not None:
            progress.close()
        padded_tokens, huge = seen.padded_tokens, seen.huge
        if huge:
            self.chain.release(route)
        limit = self.tuning.shrink_above_tokens
        if limit and padded_tokens > limit:
            trim_heap()
        return out

    def _in_flight(
        self, batches: Iterator[tuple[np.ndarray, Batch]], route: str, out: np.ndarray
    ) -> Iterator[np.ndarray]:
        """Run each batch, its vectors written to ``out[rows]`` by the thread that ran it (before
        that thread's buffers run again); yields each batch's rows once written, in order.

        With `Tuning.in_flight` above one, the next batches start on the encoder's run threads
        while the current one runs: one batch copies in and launches while another computes
        (each thread keeps its own buffers). A call of one batch (a single text, most online
        calls) runs on the caller's thread, without a hand-off."""
        depth = int(self.tuning.in_flight or 1)
        pending_batches = iter(batches)
        head = list(itertools.islice(pending_batches, 2))
        if depth <= 1 or len(head) < 2:
            for rows, batch in itertools.chain(head, pending_batches):
                self.chain.run_into(batch, route, out, rows)
                yield rows
            return
        pool = self._run_pool(depth)
        pending: deque[tuple[np.ndarray, Future[None]]] = deque()
        try:
            for rows, batch in itertools.chain(head, pending_batches):
                pending.append((rows, pool.submit(self.chain.run_into, batch, route, out, rows)))
                if len(pending) >= depth:
                    done_rows, future = pending.popleft()
                    future.result()
                    yield done_rows
            while pending:
                done_rows, future = pending.popleft()
                future.result()
                yield done_rows
        finally:
            for _, future in pending:  # a failed or abandoned call leaves nothing running
                future.cancel()
            wait([future for _, future in pending])

    def _run_pool(self, depth: int) -> ThreadPoolExecutor:
        with _POOL_LOCK:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="jobbert-onnx-run")
            return self._pool

    def _batches(self, texts: list[str], batch_size: int) -> Iterator[tuple[np.ndarray, Batch]]:
        """(input rows, padded batch) pairs: tokenized a chunk at a time, longest first within it.

        With `Tuning.overlap`, batches are padded (and later chunks tokenized) ahead in a
        thread, but only for calls of two batches or more: a call of one batch (a single
        text, most online calls) starts no thread.
        """
        if len(texts) <= TOKENIZE_CHUNK:
            tokenized = self.tokenizer.tokenize(texts)
            plans = self._plans(tokenized, batch_size)
            padded = self._pad(tokenized, plans, offset=0)
            return prefetch(padded) if self.tuning.overlap and len(plans) > 1 else padded
        chunks = self._chunks(texts, batch_size)
        return prefetch(chunks) if self.tuning.overlap else chunks

    def _chunks(self, texts: list[str], batch_size: int) -> Iterator[tuple[np.ndarray, Batch]]:
        for offset in range(0, len(texts), TOKENIZE_CHUNK):
            tokenized = self.tokenizer.tokenize(texts[offset : offset + TOKENIZE_CHUNK])
            yield from self._pad(tokenized, self._plans(tokenized, batch_size), offset)

    def _plans(self, tokenized: Tokenized, batch_size: int) -> list[BatchPlan]:
        tuning = self.tuning
        return plan_batches(
            tokenized.lengths,
            batch_size,
            tuning.buckets or None,
            tuning.token_budget,
            round_rows=bool(tuning.cuda_graphs),
            pad_to_bucket=bool(tuning.pad_to_bucket),
        )

    def _pad(self, tokenized: Tokenized, plans: list[BatchPlan], offset: int) -> Iterator[tuple[np.ndarray, Batch]]:
        for plan in plans:
            yield plan.rows + offset, self.tokenizer.pad(tokenized, plan.rows, plan.width, plan.height)

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine similarity matrix between two sets of vectors (JobBERT-v3's metric)."""
        return cosine_matrix(a, b)

    def __repr__(self) -> str:
        return (
            f"Encoder({str(self.manifest.folder)!r}, device={str(self.device)!r}, precision={self.precision!r}, "
            f"tasks={list(self.tasks)}, default_task={self.default_task!r})"
        )


def _check_options(
    convert_to_numpy: bool,
    convert_to_tensor: bool,
    precision: str,
    output_value: str | None,
    device: str | None,
    loaded_on: Device,
) -> None:
    if convert_to_tensor or not convert_to_numpy:
        raise UsageError("this runtime returns numpy arrays only; wrap the result with torch.from_numpy() if needed")
    if precision != "float32":
        raise UsageError(f"precision={precision!r} is not supported; only 'float32' vectors are returned")
    if output_value != "sentence_embedding":
        raise UsageError(f"output_value={output_value!r} is not supported; only 'sentence_embedding' is returned")
    if device is not None and device != str(loaded_on) and not (device == "cuda" and loaded_on.kind == "cuda"):
        raise UsageError(
            f"this Encoder runs on {loaded_on}; choose the device when loading: Encoder.load(path, device={device!r})"
        )
