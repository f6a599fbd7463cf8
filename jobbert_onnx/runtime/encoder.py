"""`Encoder`: the public API, a drop-in for `SentenceTransformer.encode(..., task=...)`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobbert_onnx.manifest import POOLING_FILE, TOKENIZER_FILE, Manifest, Variant, head_file, read_manifest
from jobbert_onnx.runtime.batching import check_buckets, plan_batches
from jobbert_onnx.runtime.chain import GraphChain
from jobbert_onnx.runtime.memory import trim_heap
from jobbert_onnx.runtime.prefetch import prefetch
from jobbert_onnx.runtime.progress import Progress
from jobbert_onnx.runtime.sessions import Device, choose_device
from jobbert_onnx.runtime.tokenize import Batch, TextTokenizer, Tokenized

# Texts tokenized together; batches are formed (longest first) within such a chunk.
TOKENIZE_CHUNK = 8192
# Length buckets: batches never cross one. On CUDA batches are also padded to their
# bucket (few shapes for the kernels and CUDA graphs); on the CPU only to their longest
# row, and finer buckets cut padding further. Large title batches without buckets ran at
# a quarter of the speed (benchmarks/RESULTS.md).
CUDA_BUCKETS = (8, 16, 32, 64)
CPU_BUCKETS = (8, 12, 16, 24, 32, 48, 64)
# Batches of more padded tokens than this (512 full-length skill lists) release their
# memory after running instead of keeping it in onnxruntime's arenas (benchmarks/RESULTS.md).
SHRINK_ABOVE_TOKENS = 32768


@dataclass(frozen=True)
class Scheduling:
    """How texts become batches on the loaded device (defaults depend on the device).

    Attributes:
        buckets: Length buckets no batch crosses, or None (batches of `batch_size` longest first).
        token_budget: Most padded tokens per batch, or None for `batch_size` rows.
        overlap: Tokenize and pad the next batches in a thread while the current one runs.
        pad_to_bucket: Pad batches to their bucket's length (CUDA), not their longest row.
    """

    buckets: tuple[int, ...] | None
    token_budget: int | None
    overlap: bool
    pad_to_bucket: bool


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
        raise TypeError(f"sentences must be a str or a list of str; got {type(sentences).__name__}{hint}")
    for index, item in enumerate(sentences):
        if not isinstance(item, str):
            raise TypeError(f"sentences[{index}] is {type(item).__name__}, not str; every item must be a string")
        if not item.isascii():
            _check_unicode(item, index)
    return list(sentences), False


def _check_unicode(text: str, index: int) -> None:
    """Refuse lone surrogates (text decoded with errors='surrogateescape', or broken JSON escapes):
    they are not Unicode, and the tokenizer cannot read them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"sentences[{index}] holds a lone surrogate {text[error.start]!r} at character {error.start}, "
            "which is not valid Unicode; decode the source with errors='replace' or fix it"
        ) from None


class Encoder:
    """JobBERT-v3 from an export folder, on onnxruntime, without torch.

    Example:
        >>> enc = Encoder.load("jobbert-v3-onnx/", device="auto")
        >>> titles = enc.encode(["Software Engineer", "Produktmanager"], task="anchor")
        >>> titles.shape
        (2, 1024)

    `encode` is safe to call from several threads at once: onnxruntime sessions
    allow concurrent runs, and every call binds its own inputs and outputs.
    """

    def __init__(self, manifest: Manifest, chain: GraphChain, scheduling: Scheduling) -> None:
        self.manifest = manifest
        self.chain = chain
        self.device: Device = chain.device
        self.variant: Variant = chain.variant
        self.scheduling = scheduling
        self.tokenizer = TextTokenizer(manifest.path(TOKENIZER_FILE), manifest.max_seq_length)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        precision: str | None = None,
        threads: int | None = None,
        *,
        buckets: Sequence[int] | str | None = "auto",
        token_budget: int | None = None,
        overlap: bool | None = None,
        pad_to_bucket: bool | None = None,
        reuse_buffers: bool | None = None,
        cuda_graphs: bool = False,
        spinning: bool = False,
        verify: bool = True,
        shrink_above_tokens: int | None = SHRINK_ABOVE_TOKENS,
    ) -> Encoder:
        """Load an export folder written by `jobbert-onnx export`.

        Args:
            path: The export folder.
            device: ``"auto"`` (CUDA when it really loads, else the CPU, with a
                warning), ``"cuda"``, ``"cuda:N"`` or ``"cpu"``.
            precision: Encoder variant (``fp16``, ``fp32``, ``int8``); default: fp16 on
                CUDA, and on the CPU the fastest the export holds (int8, then fp32).
            threads: onnxruntime intra-op threads per graph (default: one per core).
            buckets: Length buckets no batch crosses; ``"auto"``: (8, 16, 32, 64) on CUDA,
                where batches are padded to their bucket, and (8, 12, 16, 24, 32, 48, 64) on
                the CPU, where they are padded only to their longest row; None: no buckets.
            token_budget: Most padded tokens per batch (default: no cap beyond `batch_size`).
            overlap: Tokenize ahead in a thread (default: on for CUDA, off on the CPU,
                where the thread would take a core from the graphs).
            pad_to_bucket: Pad batches to their bucket's length (default: on for CUDA, where
                fewer shapes pay; off on the CPU, where every padded token costs time).
            reuse_buffers: Allocate device buffers once per batch shape (default: on for CUDA).
            cuda_graphs: Capture one CUDA graph per batch shape and replay it; pads every
                batch of a bucket to the same row count. CUDA only.
            verify: Check the sha256 of every file this encoder loads against the manifest
                (about a second per GB); False skips it for the fastest start-up.
            spinning: Let onnxruntime's idle threads spin for work (off: spinning threads of
                one chained session slow the next one down; benchmarks/RESULTS.md).
            shrink_above_tokens: A batch of more padded tokens (rows x length) runs with
                fresh buffers and shrinks onnxruntime's memory arenas afterwards, and a call
                of more tokens returns freed heap pages to the OS, so one huge batch does not
                hold its memory for the life of the process; None: never.

        Raises:
            ManifestError: The folder is not a complete export, lacks `precision`, or a file
                does not match its sha256.
            DeviceError: ``device="cuda"`` and CUDA cannot be used here.
        """
        manifest = read_manifest(path)
        resolved = choose_device(device, manifest.path(POOLING_FILE))
        variant = manifest.choose_variant(resolved.kind, precision)
        if verify:
            manifest.verify([variant.file, POOLING_FILE, TOKENIZER_FILE, *(head_file(r) for r in manifest.routes)])
        on_cuda = resolved.kind == "cuda"
        if isinstance(buckets, str):
            if buckets != "auto":
                raise ValueError(f"buckets must be 'auto', None or a list of lengths; got {buckets!r}")
            buckets = CUDA_BUCKETS if on_cuda or cuda_graphs else CPU_BUCKETS
        if cuda_graphs and buckets is None:
            raise ValueError("cuda_graphs=True needs length buckets (one graph per shape); leave buckets='auto'")
        if shrink_above_tokens is not None and (not isinstance(shrink_above_tokens, int) or shrink_above_tokens < 1):
            raise ValueError(f"shrink_above_tokens must be a positive integer or None; got {shrink_above_tokens!r}")
        if token_budget is not None and (not isinstance(token_budget, int) or token_budget < 1):
            raise ValueError(f"token_budget must be a positive integer or None; got {token_budget!r}")
        scheduling = Scheduling(
            buckets=None if buckets is None else check_buckets(buckets, manifest.max_seq_length),
            token_budget=token_budget,
            overlap=on_cuda if overlap is None else bool(overlap),
            pad_to_bucket=on_cuda or cuda_graphs if pad_to_bucket is None else bool(pad_to_bucket),
        )
        chain = GraphChain(
            manifest,
            variant,
            resolved,
            threads,
            reuse_buffers=reuse_buffers,
            cuda_graphs=cuda_graphs,
            spinning=spinning,
            shrink_above_tokens=shrink_above_tokens,
        )
        return cls(manifest, chain, scheduling)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The heads of the model, e.g. ``("anchor", "positive")``."""
        return self.manifest.routes

    @property
    def default_task(self) -> str:
        """The head used when `task` is None (``anchor``: job titles)."""
        return self.manifest.default_route

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
        """The head for `task` (None: the default); errors name the valid tasks."""
        if task is None:
            return self.default_task
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model has: {', '.join(self.tasks)}")
        return task

    def encode(
        self,
        sentences: str | Sequence[str],
        task: str | None = None,
        batch_size: int = 32,
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
            batch_size: Texts per graph run.
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
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        if truncate_dim is not None and not 1 <= truncate_dim <= self.get_sentence_embedding_dimension():
            raise ValueError(
                f"truncate_dim must be in [1, {self.get_sentence_embedding_dimension()}]; got {truncate_dim}"
            )
        if prompt:
            texts = [prompt + text for text in texts]

        batches = self._batches(texts, batch_size)
        if self.scheduling.overlap:
            batches = prefetch(batches)
        out = self._run(batches, len(texts), route, Progress(len(texts), bool(show_progress_bar)))

        if truncate_dim is not None:
            out = np.ascontiguousarray(out[:, :truncate_dim])
        if normalize_embeddings:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out /= np.maximum(norms, 1e-12)
        return out[0] if single else out

    def encode_tokenized(self, tokenized: Tokenized, task: str | None = None, batch_size: int = 32) -> np.ndarray:
        """Vectors [n, dim] of texts already tokenized by ``self.tokenizer.tokenize``.

        For callers that need the token counts first, as the server does to size its
        batches and to report usage; batches are planned exactly as in `encode`.
        """
        route = self.resolve_task(task)
        return self._run(self._plan(tokenized, batch_size, offset=0), len(tokenized.ids), route)

    def _run(
        self, batches: Iterator[tuple[np.ndarray, Batch]], count: int, route: str, progress: Progress | None = None
    ) -> np.ndarray:
        """Vectors [count, dim] in input order; after a call of more than `shrink_above_tokens`
        padded tokens, freed heap pages go back to the OS."""
        out = np.empty((count, self.get_sentence_embedding_dimension()), dtype=np.float32)
        padded_tokens = 0
        for rows, batch in batches:
            out[rows] = self.chain.run(batch, route)[: len(rows)]
            padded_tokens += batch.input_ids.size
            if progress is not None:
                progress.update(len(rows))
        if progress is not None:
            progress.close()
        limit = self.chain.shrink_above_tokens
        if limit is not None and padded_tokens > limit:
            trim_heap()
        return out

    def _batches(self, texts: list[str], batch_size: int) -> Iterator[tuple[np.ndarray, Batch]]:
        """(input rows, padded batch) pairs: tokenized a chunk at a time, longest first within it."""
        for offset in range(0, len(texts), TOKENIZE_CHUNK):
            tokenized = self.tokenizer.tokenize(texts[offset : offset + TOKENIZE_CHUNK])
            yield from self._plan(tokenized, batch_size, offset)

    def _plan(self, tokenized: Tokenized, batch_size: int, offset: int) -> Iterator[tuple[np.ndarray, Batch]]:
        schedule = self.scheduling
        plans = plan_batches(
            tokenized.lengths,
            batch_size,
            schedule.buckets,
            schedule.token_budget,
            fixed_height=self.chain.cuda_graphs,
            pad_to_bucket=schedule.pad_to_bucket,
        )
        for plan in plans:
            yield plan.rows + offset, self.tokenizer.pad(tokenized, plan.rows, plan.width, plan.height)

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine similarity matrix between two sets of vectors (JobBERT-v3's metric)."""
        a2 = np.atleast_2d(np.asarray(a, dtype=np.float32))
        b2 = np.atleast_2d(np.asarray(b, dtype=np.float32))
        a2 = a2 / np.maximum(np.linalg.norm(a2, axis=1, keepdims=True), 1e-12)
        b2 = b2 / np.maximum(np.linalg.norm(b2, axis=1, keepdims=True), 1e-12)
        return a2 @ b2.T

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
        raise ValueError("this runtime returns numpy arrays only; wrap the result with torch.from_numpy() if needed")
    if precision != "float32":
        raise ValueError(f"precision={precision!r} is not supported; only 'float32' vectors are returned")
    if output_value != "sentence_embedding":
        raise ValueError(f"output_value={output_value!r} is not supported; only 'sentence_embedding' is returned")
    if device is not None and device != str(loaded_on) and not (device == "cuda" and loaded_on.kind == "cuda"):
        raise ValueError(
            f"this Encoder runs on {loaded_on}; choose the device when loading: Encoder.load(path, device={device!r})"
        )
