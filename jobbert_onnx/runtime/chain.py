"""Tokens -> encoder -> pooling -> head -> vector: the graphs, chained with IO binding.

Each stage's output stays where the graphs run (GPU memory on CUDA) and is
bound as the next stage's input; only the head's [batch, dim] result is copied
to the host. On the CPU the same chain runs in host memory, so the tests on
CPU-only machines exercise the same binding code as the GPU.

With `reuse_buffers` (the default on CUDA) every batch shape gets its own set
of device buffers, allocated once and updated in place; the inputs are copied
into them and nothing else is allocated per batch. That is also what CUDA
graphs need: a captured graph replays on the same addresses, so with
`cuda_graphs` each (rows, length) shape is captured once under its own
``gpu_graph_id`` and replayed after. Without CUDA graphs at most `MAX_SHAPES`
shapes keep their buffers per thread (least recently used go first), so varied
batch sizes cannot pile up device memory.

Memory: a batch of more than `shrink_above_tokens` padded tokens runs with
fresh buffers and asks onnxruntime to shrink its memory arenas at the end of
the run, so one huge batch does not keep its memory for the life of the process.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from jobbert_onnx.manifest import (
    ATTENTION_MASK,
    EMBEDDING,
    INPUT_IDS,
    POOLING_FILE,
    SENTENCE_EMBEDDING,
    TOKEN_EMBEDDINGS,
    Manifest,
    Variant,
    head_file,
)
from jobbert_onnx.runtime.sessions import Device, create_session
from jobbert_onnx.runtime.tokenize import Batch

# Batch shapes whose buffers are kept per thread (without CUDA graphs).
MAX_SHAPES = 32


@dataclass
class _ShapeBuffers:
    """Device buffers and IO bindings for one (rows, length) batch shape."""

    input_ids: ort.OrtValue
    attention_mask: ort.OrtValue
    bindings: dict[str, ort.IOBinding] = field(default_factory=dict)


class GraphChain:
    """The sessions of one export variant on one device."""

    def __init__(
        self,
        manifest: Manifest,
        variant: Variant,
        device: Device,
        threads: int | None = None,
        *,
        reuse_buffers: bool | None = None,
        cuda_graphs: bool = False,
        spinning: bool = False,
        shrink_above_tokens: int | None = None,
    ) -> None:
        if cuda_graphs and device.kind != "cuda":
            raise ValueError("cuda_graphs=True needs device='cuda'; CUDA graphs do not exist on the CPU")
        self.device = device
        self.variant = variant
        self.hidden_size = manifest.hidden_size
        self.output_dim = manifest.output_dim
        self.cuda_graphs = cuda_graphs
        self.reuse_buffers = cuda_graphs or (device.kind == "cuda" if reuse_buffers is None else reuse_buffers)
        self._memory = ("cuda", device.index) if device.kind == "cuda" else ("cpu", 0)
        self.shrink_above_tokens = shrink_above_tokens
        self._shrink = ort.RunOptions()
        arenas = f"gpu:{device.index};cpu:0" if device.kind == "cuda" else "cpu:0"
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", arenas)

        def session(name: str) -> ort.InferenceSession:
            return create_session(manifest.path(name), device, threads, spinning=spinning, cuda_graphs=cuda_graphs)

        self.encoder = session(variant.file)
        self.pooling = session(POOLING_FILE)
        self.heads = {route: session(head_file(route)) for route in manifest.routes}
        _expect(self.encoder, [INPUT_IDS, ATTENTION_MASK], [TOKEN_EMBEDDINGS], variant.file)
        _expect(self.pooling, [TOKEN_EMBEDDINGS, ATTENTION_MASK], [SENTENCE_EMBEDDING], POOLING_FILE)
        for route, head in self.heads.items():
            _expect(head, [SENTENCE_EMBEDDING], [EMBEDDING], head_file(route))

        # Buffers are per thread, so concurrent `run`s never share them; CUDA graphs
        # replay fixed addresses, so with them there is one set, used under a lock.
        self._local = threading.local()
        self._shared: OrderedDict[tuple[int, int], _ShapeBuffers] = OrderedDict()
        self._graph_ids: dict[tuple[int, int], int] = {}
        self._lock: AbstractContextManager[object] = threading.Lock() if cuda_graphs else nullcontext()

    def run(self, batch: Batch, route: str) -> np.ndarray:
        """Vectors [batch, dim] (float32, host memory) for one padded batch."""
        huge = self.shrink_above_tokens is not None and batch.input_ids.size > self.shrink_above_tokens
        if self.reuse_buffers and not (huge and not self.cuda_graphs):
            with self._lock:
                return self._run_reusing(batch, route)
        return self.stages(batch, route, shrink=huge)[EMBEDDING].numpy()

    def stages(self, batch: Batch, route: str, shrink: bool = False) -> dict[str, ort.OrtValue]:
        """Run the chain with fresh buffers and return every stage's output, keyed by graph output name.

        Token and sentence embeddings stay in the device's memory; only the
        head's output is in host memory. With `shrink`, the stage outputs are
        allocated outside the arenas and the arenas shrink after each run.
        """
        kind, index = self._memory
        input_ids = ort.OrtValue.ortvalue_from_numpy(batch.input_ids, kind, index)
        mask = ort.OrtValue.ortvalue_from_numpy(batch.attention_mask, kind, index)
        rows, width = batch.input_ids.shape
        options = self._shrink if shrink else None
        token_shape = (rows, width, self.hidden_size) if shrink else None
        tokens = self._stage(
            self.encoder, {INPUT_IDS: input_ids, ATTENTION_MASK: mask}, TOKEN_EMBEDDINGS, options, token_shape
        )
        pooled = self._stage(
            self.pooling, {TOKEN_EMBEDDINGS: tokens, ATTENTION_MASK: mask}, SENTENCE_EMBEDDING, options
        )
        vectors = self._stage(self.heads[route], {SENTENCE_EMBEDDING: pooled}, EMBEDDING, options, to_host=True)
        return {TOKEN_EMBEDDINGS: tokens, SENTENCE_EMBEDDING: pooled, EMBEDDING: vectors}

    def _stage(
        self,
        session: ort.InferenceSession,
        inputs: dict[str, ort.OrtValue],
        output: str,
        options: ort.RunOptions | None = None,
        own_output: tuple[int, ...] | None = None,
        to_host: bool = False,
    ) -> ort.OrtValue:
        binding = session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        if own_output is not None:  # allocated here, freed with its OrtValue, never kept by an arena
            binding.bind_ortvalue_output(output, self._device_value(own_output, np.float32))
        else:
            kind, index = ("cpu", 0) if to_host else self._memory
            binding.bind_output(output, kind, index)
        session.run_with_iobinding(binding, options)
        result: ort.OrtValue = binding.get_outputs()[0]
        return result

    def _run_reusing(self, batch: Batch, route: str) -> np.ndarray:
        shape = (int(batch.input_ids.shape[0]), int(batch.input_ids.shape[1]))
        buffers = self._buffers(shape)
        buffers.input_ids.update_inplace(batch.input_ids)
        buffers.attention_mask.update_inplace(batch.attention_mask)
        options = None
        if self.cuda_graphs:
            options = ort.RunOptions()
            graph_id = self._graph_ids.setdefault(shape, len(self._graph_ids) + 1)
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        for stage, session in (("encoder", self.encoder), ("pooling", self.pooling), ("head", self.heads[route])):
            session.run_with_iobinding(self._binding(buffers, shape, stage, route), options)
        return np.asarray(self._binding(buffers, shape, "head", route).get_outputs()[0].numpy())

    def _buffers(self, shape: tuple[int, int]) -> _ShapeBuffers:
        table: OrderedDict[tuple[int, int], _ShapeBuffers]
        table = self._shared if self.cuda_graphs else self._local.__dict__.setdefault("buffers", OrderedDict())
        if shape not in table:
            if not self.cuda_graphs and len(table) >= MAX_SHAPES:
                table.popitem(last=False)  # captured graphs replay their buffers' addresses: never evict those
            table[shape] = _ShapeBuffers(self._device_value(shape, np.int64), self._device_value(shape, np.int64))
        table.move_to_end(shape)
        return table[shape]

    def cached_shapes(self) -> int:
        """Batch shapes whose buffers this thread (or, with CUDA graphs, the chain) keeps."""
        table = self._shared if self.cuda_graphs else self._local.__dict__.get("buffers", {})
        return len(table)

    def _binding(self, buffers: _ShapeBuffers, shape: tuple[int, int], stage: str, route: str) -> ort.IOBinding:
        """The IO binding of one stage (encoder, pooling, head) for one shape, made on first use."""
        key = f"head:{route}" if stage == "head" else stage
        if key in buffers.bindings:
            return buffers.bindings[key]
        rows, width = shape
        if stage == "encoder":
            binding = self.encoder.io_binding()
            binding.bind_ortvalue_input(INPUT_IDS, buffers.input_ids)
            binding.bind_ortvalue_input(ATTENTION_MASK, buffers.attention_mask)
            tokens = self._device_value((rows, width, self.hidden_size), np.float32)
            binding.bind_ortvalue_output(TOKEN_EMBEDDINGS, tokens)
        elif stage == "pooling":
            binding = self.pooling.io_binding()
            tokens = self._binding(buffers, shape, "encoder", route).get_outputs()[0]
            binding.bind_ortvalue_input(TOKEN_EMBEDDINGS, tokens)
            binding.bind_ortvalue_input(ATTENTION_MASK, buffers.attention_mask)
            binding.bind_ortvalue_output(SENTENCE_EMBEDDING, self._device_value((rows, self.hidden_size), np.float32))
        else:
            binding = self.heads[route].io_binding()
            pooled = self._binding(buffers, shape, "pooling", route).get_outputs()[0]
            binding.bind_ortvalue_input(SENTENCE_EMBEDDING, pooled)
            binding.bind_ortvalue_output(EMBEDDING, self._device_value((rows, self.output_dim), np.float32))
        buffers.bindings[key] = binding
        return binding

    def _device_value(self, shape: tuple[int, ...], dtype: type) -> ort.OrtValue:
        kind, index = self._memory
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, kind, index)


def _expect(session: ort.InferenceSession, inputs: list[str], outputs: list[str], name: str) -> None:
    found_in = [i.name for i in session.get_inputs()]
    found_out = [o.name for o in session.get_outputs()]
    if sorted(found_in) != sorted(inputs) or found_out != outputs:
        raise ValueError(
            f"{name} takes {found_in} and gives {found_out}; expected {inputs} -> {outputs}. "
            "The file is not from a compatible export: export the model again"
        )
