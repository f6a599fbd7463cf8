"""Tokens -> encoder -> pooling -> head -> vector: the graphs, chained with IO binding.

The chain is described once, as data: a `Stage` per graph, naming the values it
reads and the one it writes. One loop (`GraphChain._execute`) runs the stages
of a route over a `Buffers`, the owner of one batch shape's IO bindings. Every
stage's output stays where the graphs run (GPU memory on CUDA) and is bound as
the next stage's input; only the head's [batch, dim] result is copied to the
host. On the CPU the same chain runs in host memory, so the tests on CPU-only
machines exercise the same binding code as the GPU.

Buffers are either kept per batch shape (`Tuning.reuse_buffers`, the default
on CUDA): allocated once, inputs updated in place, nothing allocated per batch;
or fresh for one run, with the outputs allocated by the sessions. At most
`MAX_SHAPES` shapes keep their buffers per thread (least recently used go
first), so varied batch sizes cannot pile up device memory.

With `Tuning.host_output` the route's vectors are bound to a host array kept
with the shape's buffers (page-locked on CUDA, `pinned`), and `run_into` copies
them to the call's result before that thread runs the shape again.

With a merged graph (`export --merged`, `Tuning.merged`; CUDA's default where the
export has one) a route is one stage: the graph that runs encoder, pooling and
every head, bound to the one head's output, so a batch is one run.

CUDA graphs replay the addresses they were captured on, so with them each
shape's buffers are kept for the life of the chain (one set, used under a
lock) and the shape gets its own ``gpu_graph_id``. A new shape first runs with
``gpu_graph_id=-1`` (no capture), which grows onnxruntime's arena for it and
gives a reference; then it runs under its id until onnxruntime has captured
(after two regular runs of that id) and replayed, and that first replay must
match the reference. Every other run passes ``-1``, because a run without an id
would capture under onnxruntime's default one. onnxruntime keeps captured
graphs per thread, so the check is made once per thread and shape. At most
`MAX_CUDA_GRAPHS` shapes are captured; further shapes run without a graph.

Memory: a batch of more than `Tuning.shrink_above_tokens` padded tokens runs
with fresh buffers that the sessions allocate. The caller then calls `release`
once per call: one small run of the route that shrinks onnxruntime's arenas,
after every large buffer is freed (a shrink at the end of each batch would
synchronize the device each time, and could not free the outputs still held).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import onnxruntime as ort

from jobbert_onnx.errors import UsageError
from jobbert_onnx.manifest import (
    ATTENTION_MASK,
    EMBEDDING,
    INPUT_IDS,
    POOLING_FILE,
    SENTENCE_EMBEDDING,
    TOKEN_EMBEDDINGS,
    Manifest,
    ManifestError,
    Variant,
    head_file,
    merged_output,
)
from jobbert_onnx.runtime.pinned import PinnedHost
from jobbert_onnx.runtime.sessions import Device, DeviceError, create_session
from jobbert_onnx.runtime.tokenize import Batch
from jobbert_onnx.runtime.tuning import Tuning

_LOG = logging.getLogger("jobbert_onnx")
_T = TypeVar("_T")

# Batch shapes whose buffers are kept per thread (without CUDA graphs).
MAX_SHAPES = 32
# Batch shapes captured as CUDA graphs; further shapes run without one.
MAX_CUDA_GRAPHS = 64
# Runs under a new graph id until it has replayed: onnxruntime's CUDA provider makes two
# regular runs of an id before it captures, and replays right after capturing.
CAPTURE_RUNS = 3
# Largest difference allowed between a first replay and the same batch run without a graph
# (vectors lie in [-1, 1]; the two runs use the same kernels).
REPLAY_TOLERANCE = 1e-3
_NO_GRAPH = "-1"
_TYPES = {np.dtype(np.int64): "tensor(int64)", np.dtype(np.float32): "tensor(float)"}


@dataclass(frozen=True)
class Stage:
    """One graph of the chain: the values it reads, the one it writes, and that value's shape."""

    key: str
    session: ort.InferenceSession
    inputs: tuple[str, ...]
    output: str
    per_token: bool
    dim: int
    vectors: bool = False  # its output is the route's vectors (a head, or the merged graph)

    def output_shape(self, rows: int, width: int) -> tuple[int, ...]:
        return (rows, width, self.dim) if self.per_token else (rows, self.dim)


class Buffers:
    """The IO bindings of one batch shape.

    Preallocated: every stage's output gets a device buffer here, bound once, so the
    bindings replay on the same addresses (what CUDA graphs need). Otherwise the
    sessions allocate each output when they run, from their own arenas.
    """

    def __init__(
        self, memory: tuple[str, int], shape: tuple[int, int], preallocated: bool, host: PinnedHost | None = None
    ) -> None:
        self.memory = memory
        self.shape = shape
        self.preallocated = preallocated
        self.host = host if preallocated else None
        self.host_vectors: dict[str, np.ndarray] = {}  # with `host`: each route's vectors, in host memory
        self.values: dict[str, ort.OrtValue] = {}
        self._bindings: dict[str, ort.IOBinding] = {}
        if preallocated:
            self.values = {name: self.allocate(shape, np.int64) for name in (INPUT_IDS, ATTENTION_MASK)}

    def allocate(self, shape: tuple[int, ...], dtype: type) -> ort.OrtValue:
        kind, index = self.memory
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, kind, index)

    def load(self, batch: Batch) -> None:
        """Copy a batch's inputs in (in place when preallocated)."""
        if self.preallocated:
            self.values[INPUT_IDS].update_inplace(batch.input_ids)
            self.values[ATTENTION_MASK].update_inplace(batch.attention_mask)
            return
        kind, index = self.memory
        self._bindings.clear()
        self.values = {
            INPUT_IDS: ort.OrtValue.ortvalue_from_numpy(batch.input_ids, kind, index),
            ATTENTION_MASK: ort.OrtValue.ortvalue_from_numpy(batch.attention_mask, kind, index),
        }

    def binding(self, stage: Stage) -> ort.IOBinding:
        """The stage's binding, made on first use from the values earlier stages wrote."""
        binding = self._bindings.get(stage.key)
        if binding is None:
            binding = stage.session.io_binding()
            for name in stage.inputs:
                binding.bind_ortvalue_input(name, self.values[name])
            if self.host is not None and stage.vectors:
                array = self.host.array(stage.output_shape(*self.shape))
                binding.bind_output(stage.output, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
                self.host_vectors[stage.key] = array
            elif self.preallocated:
                value = self.allocate(stage.output_shape(*self.shape), np.float32)
                binding.bind_ortvalue_output(stage.output, value)
                self.values[stage.output] = value
            else:
                binding.bind_output(stage.output, *self.memory)
            self._bindings[stage.key] = binding
        return binding

    def output(self, stage: Stage) -> ort.OrtValue:
        value: ort.OrtValue = self._bindings[stage.key].get_outputs()[0]
        return value


class _ShapeCache:
    """Buffers by shape: least recently used go first, except pinned ones (captured graphs)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.table: OrderedDict[tuple[int, int], Buffers] = OrderedDict()
        self.pinned: set[tuple[int, int]] = set()

    def get(self, shape: tuple[int, int], memory: tuple[str, int], host: PinnedHost | None) -> Buffers:
        if shape not in self.table:
            if len(self.table) >= self.limit:
                for old in self.table:
                    if old not in self.pinned:
                        del self.table[old]
                        break
            self.table[shape] = Buffers(memory, shape, preallocated=True, host=host)
        self.table.move_to_end(shape)
        return self.table[shape]


class GraphChain:
    """The sessions of one export variant on one device, and the loop that runs them."""

    def __init__(
        self, manifest: Manifest, variant: Variant, device: Device, tuning: Tuning, threads: int | None = None
    ) -> None:
        if tuning.buckets is None:
            raise ValueError("GraphChain needs a resolved Tuning: pass tuning.resolve(device.kind, max_seq_length)")
        self.device = device
        self.variant = variant
        self.tuning = tuning
        self.cuda_graphs = bool(tuning.cuda_graphs)
        self._memory = ("cuda", device.index) if device.kind == "cuda" else ("cpu", 0)

        def session(name: str) -> ort.InferenceSession:
            return create_session(
                manifest.path(name), device, threads, spinning=bool(tuning.spinning), cuda_graphs=self.cuda_graphs
            )

        dim = manifest.output_dim
        self.merged = uses_merged(tuning, variant, device)
        self.routes: dict[str, tuple[Stage, ...]]
        if self.merged:
            # One session runs it all: `encoder`, `pooling` and every head name it.
            name = str(variant.merged_file)
            self.encoder = self.pooling = session(name)
            self.heads = dict.fromkeys(manifest.routes, self.encoder)
            self.routes = {
                route: (
                    Stage(
                        f"merged:{route}",
                        self.encoder,
                        (INPUT_IDS, ATTENTION_MASK),
                        merged_output(route),
                        False,
                        dim,
                        vectors=True,
                    ),
                )
                for route in manifest.routes
            }
            tokens: dict[str, type] = {INPUT_IDS: np.int64, ATTENTION_MASK: np.int64}
            _expect_io(self.encoder, name, tokens, {merged_output(route): np.float32 for route in manifest.routes})
        else:
            self._chain(manifest, encoder_graph(tuning, variant, device), session)
        self._init_runs(device)

    def _chain(self, manifest: Manifest, encoder_file: str, session: Callable[[str], ort.InferenceSession]) -> None:
        """The encoder, pooling and head sessions, chained."""
        hidden, dim = manifest.hidden_size, manifest.output_dim
        self.encoder = session(encoder_file)
        self.pooling = session(POOLING_FILE)
        self.heads = {route: session(head_file(route)) for route in manifest.routes}
        encoder = Stage("encoder", self.encoder, (INPUT_IDS, ATTENTION_MASK), TOKEN_EMBEDDINGS, True, hidden)
        pooling = Stage("pooling", self.pooling, (TOKEN_EMBEDDINGS, ATTENTION_MASK), SENTENCE_EMBEDDING, False, hidden)
        self.routes = {
            route: (
                encoder,
                pooling,
                Stage(f"head:{route}", head, (SENTENCE_EMBEDDING,), EMBEDDING, False, dim, vectors=True),
            )
            for route, head in self.heads.items()
        }
        _expect(encoder, encoder_file, {INPUT_IDS: np.int64, ATTENTION_MASK: np.int64})
        _expect(pooling, POOLING_FILE, {TOKEN_EMBEDDINGS: np.float32, ATTENTION_MASK: np.int64})
        for route, stages in self.routes.items():
            _expect(stages[-1], head_file(route), {SENTENCE_EMBEDDING: np.float32})

    def _init_runs(self, device: Device) -> None:
        """Run options, and where buffers and captured graphs are kept."""
        self._options = {_NO_GRAPH: _run_options("gpu_graph_id", _NO_GRAPH)}
        arenas = f"gpu:{device.index};cpu:0" if device.kind == "cuda" else "cpu:0"
        self._shrink = _run_options("memory.enable_memory_arena_shrinkage", arenas)
        self.shrink_failure: str | None = None  # why onnxruntime refused the shrink, once it has
        # Buffers are per thread, so concurrent `run`s never share them; CUDA graphs
        # replay fixed addresses, so with them there is one set, used under a lock.
        self._local = threading.local()
        self._shared = _ShapeCache(MAX_SHAPES + MAX_CUDA_GRAPHS)
        self._graph_ids: dict[tuple[int, int], str] = {}
        self._lock: AbstractContextManager[object] = threading.Lock() if self.cuda_graphs else nullcontext()
        self.host = PinnedHost(pin=device.kind == "cuda") if self.tuning.host_output else None

    def is_huge(self, batch: Batch) -> bool:
        """Whether the batch runs with fresh buffers and calls for a `release` after the call."""
        limit = self.tuning.shrink_above_tokens
        return bool(limit) and batch.input_ids.size > int(limit or 0)

    def run(self, batch: Batch, route: str) -> np.ndarray:
        """Vectors [batch, dim] (float32, host memory, the caller's own) for one padded batch."""
        return self._run(batch, route, _Result.numpy)

    def run_into(self, batch: Batch, route: str, out: np.ndarray, rows: np.ndarray) -> None:
        """Write the vectors of the batch's first ``len(rows)`` rows to ``out[rows]``, straight from
        where the run left them (no array of its own with `Tuning.host_output`, nor on the CPU)."""

        def scatter(result: _Result) -> None:
            out[rows] = result.view()[: len(rows)]

        self._run(batch, route, scatter)

    def _run(self, batch: Batch, route: str, take: Callable[[_Result], _T]) -> _T:
        """Run a batch and hand its result to `take` before its buffers can run again."""
        stages = self.routes[route]
        if not self.tuning.reuse_buffers or self.is_huge(batch):
            with self._lock:  # with CUDA graphs, no run may overlap a replay: it would reuse the graphs' memory
                return take(self._execute(stages, self.fresh(batch), self._plain))
        shape = (int(batch.input_ids.shape[0]), int(batch.input_ids.shape[1]))
        with self._lock:
            buffers = self._cache().get(shape, self._memory, self.host)
            buffers.load(batch)
            if not self.cuda_graphs:
                return take(self._execute(stages, buffers, None))
            return take(self._run_graph(stages, buffers))

    def outputs(self, batch: Batch, route: str) -> dict[str, ort.OrtValue]:
        """Every stage's output for one batch, keyed by graph output name, all in the device's memory."""
        stages = self.routes[route]
        with self._lock:
            values = self._execute(stages, self.fresh(batch), self._plain).buffers.values
        return {stage.output: values[stage.output] for stage in stages}

    def release(self, route: str) -> bool:
        """Shrink onnxruntime's arenas once, after a call that ran huge batches (never with CUDA graphs).

        The call's vectors are already out, so a shrink that onnxruntime refuses (an arena
        it does not know by the name given, say) is logged once and not tried again; it
        never fails the call. Returns whether the arenas shrank.
        """
        if self.cuda_graphs or self.shrink_failure is not None:
            return False
        one = Batch(input_ids=np.full((1, 1), 0, dtype=np.int64), attention_mask=np.ones((1, 1), dtype=np.int64))
        buffers = Buffers(self._memory, (1, 1), preallocated=True)  # outside the arenas that are to shrink
        buffers.load(one)
        try:
            self._execute(self.routes[route], buffers, self._shrink)
        except Exception as error:  # onnxruntime raises its own exception types, not RuntimeError subclasses
            self.shrink_failure = f"{type(error).__name__}: {error}"
            _LOG.warning(
                "onnxruntime refused to shrink its memory arenas (%s); the vectors are unaffected, "
                "and memory that huge batches took stays reserved; pass Tuning(shrink_above_tokens=0) "
                "to stop trying",
                self.shrink_failure,
            )
            return False
        return True

    def cached_shapes(self) -> int:
        """Batch shapes whose buffers this thread (or, with CUDA graphs, the chain) keeps."""
        return len(self._cache().table)

    def captured_shapes(self) -> list[tuple[int, int]]:
        """Shapes given a CUDA graph id, in the order they were captured."""
        return list(self._graph_ids)

    def _execute(self, stages: tuple[Stage, ...], buffers: Buffers, options: ort.RunOptions | None) -> _Result:
        """The one run loop: each stage in order, its inputs bound to the values the earlier stages wrote."""
        for stage in stages:
            stage.session.run_with_iobinding(buffers.binding(stage), options)
            if not buffers.preallocated:  # the session allocated it: known only now
                buffers.values[stage.output] = buffers.output(stage)
        return _Result(buffers, stages[-1])

    def _run_graph(self, stages: tuple[Stage, ...], buffers: Buffers) -> _Result:
        shape = buffers.shape
        graph_id = self._graph_ids.get(shape)
        if graph_id is None:
            if len(self._graph_ids) >= MAX_CUDA_GRAPHS:
                return self._execute(stages, buffers, self._plain)
            graph_id = self._graph_ids[shape] = str(len(self._graph_ids) + 1)
            self._shared.pinned.add(shape)
            self._options[graph_id] = _run_options("gpu_graph_id", graph_id)
        # Checked per head and shape: each head's session captures its own graph under the shape's id.
        checked: set[tuple[str, tuple[int, int]]] = self._local.__dict__.setdefault("replayed", set())
        key = (stages[-1].key, shape)
        options = self._options[graph_id]
        if key in checked:
            return self._execute(stages, buffers, options)
        reference = self._execute(stages, buffers, self._plain).numpy()
        for _ in range(CAPTURE_RUNS):
            result = self._execute(stages, buffers, options)
        replayed = result.numpy()
        difference = float(np.abs(replayed - reference).max())
        if not difference <= REPLAY_TOLERANCE:
            raise DeviceError(
                f"the CUDA graph captured for batch shape {shape} replays to vectors that differ from a run "
                f"without it by {difference:.3g} (> {REPLAY_TOLERANCE}): load with cuda_graphs=False"
            )
        checked.add(key)
        return result

    @property
    def _plain(self) -> ort.RunOptions | None:
        """Options of a run that must not capture: with CUDA graphs on, gpu_graph_id=-1."""
        return self._options[_NO_GRAPH] if self.cuda_graphs else None

    def fresh(self, batch: Batch) -> Buffers:
        """Buffers for one run of `batch`: its inputs copied to the device, outputs left to the sessions."""
        buffers = Buffers(self._memory, (int(batch.input_ids.shape[0]), int(batch.input_ids.shape[1])), False)
        buffers.load(batch)
        return buffers

    def _cache(self) -> _ShapeCache:
        if self.cuda_graphs:
            return self._shared
        cache: _ShapeCache = self._local.__dict__.setdefault("cache", _ShapeCache(MAX_SHAPES))
        return cache


@dataclass(frozen=True)
class _Result:
    """What a run left in its buffers; the last stage's output is the route's vectors."""

    buffers: Buffers
    last: Stage

    def numpy(self) -> np.ndarray:
        """The vectors in host memory, owned by the caller."""
        vectors = self.view()
        # A host buffer, and on the CPU numpy()'s view, are what the next batch of this shape overwrites.
        kept = self.last.key in self.buffers.host_vectors
        return vectors.copy() if kept or (self.buffers.preallocated and self.buffers.memory[0] == "cpu") else vectors

    def view(self) -> np.ndarray:
        """The vectors in host memory, valid until these buffers run again."""
        host = self.buffers.host_vectors.get(self.last.key)
        if host is not None:
            return host
        return np.asarray(self.buffers.output(self.last).numpy())


def _run_options(key: str, value: str) -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry(key, value)
    return options


def encoder_graph(tuning: Tuning, variant: Variant, device: Device) -> str:
    """The encoder file the chain runs: the variant's, or with `tuning.packed` its packed form (CUDA only)."""
    if not tuning.packed:
        return variant.file
    if tuning.merged:
        raise UsageError("packed=True and merged=True exclude each other: the packed encoder runs in the chain")
    if device.kind != "cuda":
        raise UsageError("packed=True needs device='cuda': RemovePadding and PackedAttention have CUDA kernels only")
    if not variant.packed_file:
        raise UsageError(
            f"packed=True, but this export has no packed {variant.precision} encoder: export it again with --packed"
        )
    return variant.packed_file


def uses_merged(tuning: Tuning, variant: Variant, device: Device) -> bool:
    """Whether to run the variant's merged graph: as `tuning.merged` says, and by default on CUDA
    where the export has one (not with the packed encoder, which runs in the chain)."""
    if tuning.packed:
        return False
    if tuning.merged and not variant.merged_file:
        raise UsageError(
            f"merged=True, but this export has no merged {variant.precision} graph: export it again with "
            "--merged (fp16), or leave Tuning.merged at None"
        )
    if tuning.merged is None:
        return device.kind == "cuda" and variant.merged_file is not None
    return bool(tuning.merged)


def _expect(stage: Stage, name: str, inputs: dict[str, type]) -> None:
    """Check a chained graph's inputs and output (names and types) once, at load."""
    _expect_io(stage.session, name, inputs, {stage.output: np.float32})


def _expect_io(session: ort.InferenceSession, name: str, inputs: dict[str, type], outputs: dict[str, type]) -> None:
    """Check a graph's inputs and outputs (names and types) once, at load."""
    found_in = {i.name: i.type for i in session.get_inputs()}
    found_out = {o.name: o.type for o in session.get_outputs()}
    wanted_in = {key: _TYPES[np.dtype(dtype)] for key, dtype in inputs.items()}
    wanted_out = {key: _TYPES[np.dtype(dtype)] for key, dtype in outputs.items()}
    if found_in != wanted_in or found_out != wanted_out:
        raise ManifestError(
            f"{name} takes {found_in} and gives {found_out}; expected {wanted_in} -> {wanted_out}. "
            "The file is not from a compatible export: export the model again"
        )
