"""One merged graph per export variant, run without IO binding or length buckets: what a plain
onnxruntime user would write (the CPU plan's merged contender). The runtime's own merged graph
(`export --merged`, `Tuning.merged`) is measured as a configuration of the runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from jobbert_onnx.export.merged import merge as merged_graph
from jobbert_onnx.manifest import TOKENIZER_FILE, merged_output, read_manifest
from jobbert_onnx.runtime.batching import plan_batches
from jobbert_onnx.runtime.sessions import Device, parse_device, session_options
from jobbert_onnx.runtime.tokenize import TextTokenizer


def merge(folder: Path, precision: str) -> onnx.ModelProto:
    """input_ids, attention_mask -> embedding_<route> for every route, in one graph."""
    manifest = read_manifest(folder)
    return merged_graph(folder, manifest.variants[precision].file, manifest.routes)


class MergedEncoder:
    """Encode with the merged graph, batching exactly as the runtime does on the CPU."""

    def __init__(self, folder: Path, precision: str, device: str = "cpu") -> None:
        manifest = read_manifest(folder)
        kind, index = parse_device(device)
        providers = Device("cuda" if kind == "cuda" else "cpu", index).providers()
        model = merge(folder, precision).SerializeToString()
        self.session = ort.InferenceSession(model, session_options(), providers=providers)
        self.provider = self.session.get_providers()[0]
        self.tokenizer = TextTokenizer(manifest.path(TOKENIZER_FILE), manifest.max_seq_length)
        self.dim = manifest.output_dim

    def encode(self, texts: list[str], task: str, batch_size: int) -> np.ndarray:
        tokenized = self.tokenizer.tokenize(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for plan in plan_batches(tokenized.lengths, batch_size):
            batch = self.tokenizer.pad(tokenized, plan.rows)
            feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            out[plan.rows] = self.session.run([merged_output(task)], feeds)[0]
        return out
