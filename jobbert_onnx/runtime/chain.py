"""Tokens -> encoder -> pooling -> head -> vector: the graphs, chained with IO binding.

Each stage's output stays where the graphs run (GPU memory on CUDA) and is
bound as the next stage's input; only the head's [batch, dim] result is copied
to the host. On the CPU the same chain runs in host memory, so the tests on
CPU-only machines exercise the same binding code as the GPU.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from jobbert_onnx.manifest import (
    ATTENTION_MASK,
    EMBEDDING,
    ENCODER_FILE,
    INPUT_IDS,
    POOLING_FILE,
    SENTENCE_EMBEDDING,
    TOKEN_EMBEDDINGS,
    Manifest,
    head_file,
)
from jobbert_onnx.runtime.sessions import Device, create_session
from jobbert_onnx.runtime.tokenize import Batch


class GraphChain:
    """The four sessions of one export on one device."""

    def __init__(self, manifest: Manifest, device: Device, threads: int | None = None) -> None:
        self.device = device
        self._memory = ("cuda", device.index) if device.kind == "cuda" else ("cpu", 0)
        self.encoder = create_session(manifest.path(ENCODER_FILE), device, threads)
        self.pooling = create_session(manifest.path(POOLING_FILE), device, threads)
        self.heads = {
            route: create_session(manifest.path(head_file(route)), device, threads) for route in manifest.routes
        }
        _expect(self.encoder, [INPUT_IDS, ATTENTION_MASK], [TOKEN_EMBEDDINGS], ENCODER_FILE)
        _expect(self.pooling, [TOKEN_EMBEDDINGS, ATTENTION_MASK], [SENTENCE_EMBEDDING], POOLING_FILE)
        for route, session in self.heads.items():
            _expect(session, [SENTENCE_EMBEDDING], [EMBEDDING], head_file(route))

    def run(self, batch: Batch, route: str) -> np.ndarray:
        """Vectors [batch, dim] (float32, host memory) for one padded batch."""
        return self.stages(batch, route)[EMBEDDING].numpy()

    def stages(self, batch: Batch, route: str) -> dict[str, ort.OrtValue]:
        """Run the chain and return every stage's output, keyed by graph output name.

        Token and sentence embeddings stay in the device's memory; only the
        head's output is in host memory.
        """
        kind, index = self._memory
        input_ids = ort.OrtValue.ortvalue_from_numpy(batch.input_ids, kind, index)
        mask = ort.OrtValue.ortvalue_from_numpy(batch.attention_mask, kind, index)
        tokens = self._stage(self.encoder, {INPUT_IDS: input_ids, ATTENTION_MASK: mask}, TOKEN_EMBEDDINGS)
        pooled = self._stage(self.pooling, {TOKEN_EMBEDDINGS: tokens, ATTENTION_MASK: mask}, SENTENCE_EMBEDDING)
        vectors = self._stage(self.heads[route], {SENTENCE_EMBEDDING: pooled}, EMBEDDING, to_host=True)
        return {TOKEN_EMBEDDINGS: tokens, SENTENCE_EMBEDDING: pooled, EMBEDDING: vectors}

    def _stage(
        self, session: ort.InferenceSession, inputs: dict[str, ort.OrtValue], output: str, to_host: bool = False
    ) -> ort.OrtValue:
        binding = session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        kind, index = ("cpu", 0) if to_host else self._memory
        binding.bind_output(output, kind, index)
        session.run_with_iobinding(binding)
        result: ort.OrtValue = binding.get_outputs()[0]
        return result


def _expect(session: ort.InferenceSession, inputs: list[str], outputs: list[str], name: str) -> None:
    found_in = [i.name for i in session.get_inputs()]
    found_out = [o.name for o in session.get_outputs()]
    if sorted(found_in) != sorted(inputs) or found_out != outputs:
        raise ValueError(
            f"{name} takes {found_in} and gives {found_out}; expected {inputs} -> {outputs}. "
            "The file is not from a compatible export: export the model again"
        )
