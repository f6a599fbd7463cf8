"""The CUDA path: run where onnxruntime's CUDA provider really loads.

Skipped, with the reason, where CUDA cannot be used; with ``--require-cuda``
(the GPU proof) they fail there instead, so a broken CUDA install never passes
as a green run on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import _quiet, assert_close, parity_texts

from jobbert_onnx import Encoder, Tuning
from jobbert_onnx.export import export_model
from jobbert_onnx.manifest import POOLING_FILE, TOKEN_EMBEDDINGS
from jobbert_onnx.vectors import row_cosines as cosines

pytestmark = pytest.mark.gpu
CUDA_PROVIDER = "CUDAExecutionProvider"


def _parity_on_cuda(export: Path, reference: np.ndarray, texts: list[str], task: str, **load: Any) -> np.ndarray:
    encoder = Encoder.load(export, device="cuda", **load)
    assert encoder.precision == "fp16", "fp16 is the CUDA default"
    assert encoder.chain.encoder.get_providers()[0] == CUDA_PROVIDER
    for graph in (encoder.chain.encoder, encoder.chain.pooling):  # what is fp32 here is meant as fp32
        assert graph.get_provider_options()[CUDA_PROVIDER]["use_tf32"] == "0"
    got = encoder.encode(texts, task=task)
    cos = cosines(got, reference)
    assert cos.min() >= 0.999 and cos.mean() >= 0.9999, f"{task}: min {cos.min():.6f}, mean {cos.mean():.6f}"
    return got


@pytest.mark.parametrize("task", ["anchor", "positive"])
def test_fp16_on_cuda_matches_fp32_pytorch(
    cuda_ready: None, tiny_exports: dict, st_models: dict[str, Any], task: str
) -> None:
    texts = parity_texts()
    _parity_on_cuda(tiny_exports[("router", "fp16")], st_models["router"].encode(texts, task=task), texts, task)


@pytest.mark.parametrize("form", ["lengths", "2d"])
def test_every_attention_mask_form_matches_on_cuda(
    cuda_ready: None, tiny_models: dict, st_models: dict[str, Any], tmp_path: Path, form: str
) -> None:
    """The default fp16 form (lengths-starts) is covered above; the other forms give the same vectors."""
    folder = tmp_path / form
    export_model(str(tiny_models["router"]), folder, precision="fp16", attention_mask=form, log=_quiet)
    texts = parity_texts()
    for task in ("anchor", "positive"):
        _parity_on_cuda(folder, st_models["router"].encode(texts, task=task), texts, task)


def test_the_merged_graph_is_cudas_default_and_matches_fp32_pytorch(
    cuda_ready: None, tiny_models: dict, st_models: dict[str, Any], tmp_path: Path
) -> None:
    folder = tmp_path / "merged"
    export_model(str(tiny_models["router"]), folder, precision="fp16", merged=True, log=_quiet)
    texts = parity_texts()
    for task in ("anchor", "positive"):
        reference = st_models["router"].encode(texts, task=task)
        got = _parity_on_cuda(folder, reference, texts, task)
        graphs = _parity_on_cuda(folder, reference, texts, task, tuning=Tuning(cuda_graphs=True))
        chained = _parity_on_cuda(folder, reference, texts, task, tuning=Tuning(merged=False))
        assert_close(got, chained, 2e-3, f"{task}: merged against chained")
        assert_close(graphs, got, 2e-3, f"{task}: merged with CUDA graphs")
    assert Encoder.load(folder, device="cuda").chain.merged, "the default on CUDA where the export has it"


def test_the_packed_encoder_on_cuda_matches_fp32_pytorch_and_its_batches(
    cuda_ready: None, tiny_models: dict, st_models: dict[str, Any], tmp_path: Path
) -> None:
    """No padding inside: the export validates it on CUDA, and a text's vector does not depend on its batch."""
    folder = tmp_path / "packed"
    manifest = export_model(str(tiny_models["router"]), folder, precision="fp16", packed=True, log=_quiet)
    assert manifest["variants"]["fp16"]["validation"]["packed"]["heads"], "validated on CUDA at export"
    texts = parity_texts()
    encoder = Encoder.load(folder, device="cuda", tuning=Tuning(packed=True))
    for task in ("anchor", "positive"):
        got = _parity_on_cuda(
            folder, st_models["router"].encode(texts, task=task), texts, task, tuning=Tuning(packed=True)
        )
        alone = np.stack([encoder.encode(text, task=task) for text in texts])
        assert_close(got, alone, 2e-3, f"{task}: packed, batch against alone")


@pytest.mark.fullsize
@pytest.mark.parametrize("task", ["anchor", "positive"])
def test_full_size_fp16_on_cuda_matches_fp32_pytorch(
    cuda_ready: None, full_model: Path, full_exports: dict[str, Path], task: str
) -> None:
    from sentence_transformers import SentenceTransformer

    texts = parity_texts()
    reference = SentenceTransformer(str(full_model), device="cpu").encode(texts, task=task)
    _parity_on_cuda(full_exports["fp16"], reference, texts, task)
    _parity_on_cuda(full_exports["fp16"], reference, texts, task, tuning=Tuning(cuda_graphs=True))


def test_batch_invariance_on_cuda(cuda_ready: None, tiny_exports: dict) -> None:
    encoder = Encoder.load(tiny_exports[("router", "fp16")], device="cuda")
    texts = parity_texts()
    alone = np.stack([encoder.encode(t, task="positive") for t in texts])
    for batch_size in (3, 64):
        assert_close(encoder.encode(texts, task="positive", batch_size=batch_size), alone, 2e-3, f"batch {batch_size}")


def test_vectors_into_page_locked_host_buffers_match_and_stay_apart(cuda_ready: None, tiny_exports: dict) -> None:
    """`Tuning.host_output` on CUDA: the buffers are page-locked, and two batches in flight writing
    through them give the default path's vectors."""
    folder = tiny_exports[("router", "fp16")]
    plain = Encoder.load(folder, device="cuda")
    host = Encoder.load(folder, device="cuda", tuning=Tuning(host_output=True))
    texts = [*parity_texts(), *(f"python, sql, docker {i}, " * (i % 9) for i in range(60))]
    for task in ("anchor", "positive"):
        expected = plain.encode(texts, task=task, batch_size=5)
        assert np.array_equal(host.encode(texts, task=task, batch_size=5), expected), task
    assert host.chain.host is not None and host.chain.host.failure is None, host.chain.host.failure
    assert host.chain.host.pinned_bytes > 0


def test_cuda_graphs_replay_what_a_plain_run_gives(cuda_ready: None, tiny_exports: dict) -> None:
    plain = Encoder.load(tiny_exports[("router", "fp16")], device="cuda")
    graphs = Encoder.load(tiny_exports[("router", "fp16")], device="cuda", tuning=Tuning(cuda_graphs=True))
    texts = parity_texts()
    for task in ("anchor", "positive"):
        expected = plain.encode(texts, task=task, batch_size=8)
        for _ in range(3):  # capture (checked inside against a plain run), then replays
            assert_close(graphs.encode(texts, task=task, batch_size=8), expected, 2e-3, f"{task} with CUDA graphs")
        for text in texts[:5]:  # one row: its own small graph, not a full batch of filler
            assert_close(graphs.encode(text, task=task), plain.encode(text, task=task), 2e-3, "one text")
    assert any(rows == 1 for rows, _ in graphs.chain.captured_shapes())


def test_intermediates_stay_on_the_gpu(cuda_ready: None, tiny_exports: dict) -> None:
    encoder = Encoder.load(tiny_exports[("router", "fp16")], device="cuda")
    tokenized = encoder.tokenizer.tokenize(["Software Engineer", "python, sql, data pipelines"])
    outputs = encoder.chain.outputs(encoder.tokenizer.pad(tokenized, np.arange(2)), "anchor")
    assert all(value.device_name().lower() == "cuda" for value in outputs.values()), outputs


def test_padded_positions_never_reach_a_vector_on_cuda(cuda_ready: None, tiny_exports: dict) -> None:
    """Whatever the GPU attention kernel leaves at padded positions, the pooled vectors stay finite."""
    import onnxruntime as ort

    encoder = Encoder.load(tiny_exports[("router", "fp16")], device="cuda")
    texts = ["Koch", "python, sql, data pipelines, docker, kubernetes, " * 3]
    tokenized = encoder.tokenizer.tokenize(texts)
    batch = encoder.tokenizer.pad(tokenized, np.arange(2), width=64, height=4)
    tokens = encoder.chain.outputs(batch, "anchor")[TOKEN_EMBEDDINGS].numpy()
    poisoned = np.where(batch.attention_mask[..., None] == 1, tokens, np.nan).astype(np.float32)
    pooling = ort.InferenceSession(
        str(tiny_exports[("router", "fp16")] / POOLING_FILE), providers=[CUDA_PROVIDER, "CPUExecutionProvider"]
    )
    pooled = pooling.run(None, {TOKEN_EMBEDDINGS: poisoned, "attention_mask": batch.attention_mask})[0]
    assert np.isfinite(pooled).all()
    assert np.isfinite(encoder.encode(texts)).all()


def test_a_batch_over_the_shrink_threshold_shrinks_the_cuda_arena_and_keeps_its_vectors(
    cuda_ready: None, tiny_exports: dict
) -> None:
    """600 skill lists of 64 tokens in one batch (38,400 padded tokens, above `shrink_above_tokens`):
    the call ends with an arena shrink naming ``gpu:N``, which this onnxruntime must accept."""
    tuning = Tuning(token_budget=65536, shrink_above_tokens=32768)  # CUDA's default budget splits such a batch
    encoder = Encoder.load(tiny_exports[("router", "fp16")], device="cuda", tuning=tuning)
    texts = [f"python, sql, docker {i}, kubernetes, " * 12 for i in range(600)]
    huge = encoder.encode(texts, task="positive", batch_size=600)
    assert encoder.chain.shrink_failure is None, encoder.chain.shrink_failure
    assert encoder.chain.release("positive") is True
    assert_close(huge, encoder.encode(texts, task="positive", batch_size=32), 2e-3, "one huge batch against 32s")
