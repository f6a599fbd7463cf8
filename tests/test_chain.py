"""The chain's one run loop, its buffers, and its CUDA-graph bookkeeping (checked on the CPU provider).

onnxruntime's CPU provider ignores ``gpu_graph_id``, so a chain built with CUDA
graphs on the CPU runs exactly like one without them: what these tests check is
which graph id every run carries, when a shape is captured and verified, and
that the bounds hold. Capture and replay themselves need a GPU (tests/test_gpu.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import assert_close, parity_texts

from jobbert_onnx import DeviceError, Encoder, Tuning
from jobbert_onnx.manifest import EMBEDDING, SENTENCE_EMBEDDING, TOKEN_EMBEDDINGS, read_manifest
from jobbert_onnx.runtime import chain as chain_module
from jobbert_onnx.runtime import encoder as encoder_module
from jobbert_onnx.runtime.chain import GraphChain
from jobbert_onnx.runtime.sessions import Device


def _graph_chain_on_cpu(folder: Path) -> Encoder:
    """An encoder whose chain does the CUDA-graph bookkeeping, on the CPU provider."""
    manifest = read_manifest(folder)
    tuning = Tuning(reuse_buffers=True, pad_to_bucket=True).resolve("cpu", manifest.max_seq_length)
    tuning = Tuning(**{**tuning.__dict__, "cuda_graphs": True})  # past the device check, on purpose
    return Encoder(manifest, GraphChain(manifest, manifest.variants["fp32"], Device("cpu"), tuning))


def _entry(options: ort.RunOptions | None, key: str) -> str:
    if options is None:
        return ""
    try:
        return str(options.get_run_config_entry(key))
    except RuntimeError:  # not set
        return ""


class _RunLog:
    """Wraps every session of a chain to record the gpu_graph_id each run carried."""

    def __init__(self, encoder: Encoder) -> None:
        self.ids: list[str] = []
        self.shrinks = 0
        seen = set()
        for stages in encoder.chain.routes.values():
            for stage in stages:
                if id(stage.session) not in seen:
                    seen.add(id(stage.session))
                    self._wrap(stage.session, stage.key)

    def _wrap(self, session: ort.InferenceSession, key: str) -> None:
        run = session.run_with_iobinding

        def logged(binding: ort.IOBinding, options: ort.RunOptions | None = None) -> None:
            if key == "encoder":
                self.ids.append(_entry(options, "gpu_graph_id") or "(none)")
                self.shrinks += bool(_entry(options, "memory.enable_memory_arena_shrinkage"))
            run(binding, options)

        session.run_with_iobinding = logged  # type: ignore[method-assign]


def test_every_graph_run_carries_an_id_and_each_shape_is_checked_once(tiny_exports: dict) -> None:
    encoder = _graph_chain_on_cpu(tiny_exports[("router", "fp32")])
    log = _RunLog(encoder)
    plain = Encoder.load(tiny_exports[("router", "fp32")], device="cpu", precision="fp32")
    encoder.encode("Koch", task="anchor")
    # A new shape: one run without a graph (the reference), then three under its id.
    assert log.ids == ["-1", "1", "1", "1"]
    encoder.encode("Bäcker", task="anchor")
    assert log.ids[4:] == ["1"], "a checked shape replays at once"
    encoder.encode("Bäcker", task="positive")
    assert log.ids[5:] == ["-1", "1", "1", "1"], "the other head's graph at that shape is checked in its turn"
    encoder.encode("Koch", task="positive")
    assert log.ids[9:] == ["1"]
    texts = parity_texts()
    got = encoder.encode(texts, task="positive", batch_size=8)
    assert "(none)" not in log.ids, "a run without an id would capture under onnxruntime's default one"
    assert_close(got, plain.encode(texts, task="positive", batch_size=8), 1e-5, "graph bookkeeping vs plain")
    shapes = encoder.chain.captured_shapes()
    assert len(shapes) == len(set(shapes)) > 1
    assert all(rows & (rows - 1) == 0 for rows, _ in shapes), "rows rounded to powers of two"
    assert {width for _, width in shapes} <= set(encoder.tuning.buckets or ())


def test_the_number_of_captured_graphs_is_bounded(tiny_exports: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chain_module, "MAX_CUDA_GRAPHS", 2)
    encoder = _graph_chain_on_cpu(tiny_exports[("router", "fp32")])
    log = _RunLog(encoder)
    for rows in (1, 2, 4, 8):
        encoder.encode([f"Data Analyst {i}" for i in range(rows)], batch_size=rows)
    assert encoder.chain.captured_shapes() == [(1, 8), (2, 8)]
    assert log.ids[-1] == "-1", "shapes beyond the bound run without a graph"
    assert "3" not in log.ids


def test_a_replay_that_differs_is_an_error(tiny_exports: dict) -> None:
    encoder = _graph_chain_on_cpu(tiny_exports[("router", "fp32")])
    head = encoder.chain.routes["anchor"][-1].session
    run = head.run_with_iobinding

    def corrupt_replays(binding: ort.IOBinding, options: ort.RunOptions | None = None) -> None:
        run(binding, options)
        if _entry(options, "gpu_graph_id") not in ("", "-1"):
            binding.get_outputs()[0].update_inplace(np.zeros((1, 1024), dtype=np.float32))

    head.run_with_iobinding = corrupt_replays  # type: ignore[method-assign]
    with pytest.raises(DeviceError, match=r"differ from a run without it .*load with cuda_graphs=False"):
        encoder.encode("Koch", task="anchor")


def test_each_thread_checks_its_own_replays(tiny_exports: dict) -> None:
    """onnxruntime keeps captured graphs per thread: a second thread captures, and is checked, again."""
    encoder = _graph_chain_on_cpu(tiny_exports[("router", "fp32")])
    log = _RunLog(encoder)
    encoder.encode("Koch")
    worker = threading.Thread(target=encoder.encode, args=("Koch",))
    worker.start()
    worker.join()
    assert log.ids == ["-1", "1", "1", "1"] * 2


def test_huge_batches_run_fresh_and_the_call_shrinks_once(tiny_exports: dict) -> None:
    tuning = Tuning(reuse_buffers=True, shrink_above_tokens=100)
    encoder = Encoder.load(tiny_exports[("router", "fp32")], device="cpu", precision="fp32", tuning=tuning)
    log = _RunLog(encoder)
    texts = [f"python, sql, docker {i}, " * 20 for i in range(40)]
    encoder.encode(texts, batch_size=8)  # five huge batches
    assert log.shrinks == 1 and len(log.ids) == 6, "one shrink per call, after the last batch"
    assert encoder.chain.cached_shapes() == 0
    encoder.encode(["Koch"] * 3, batch_size=8)
    assert log.shrinks == 1, "a call without a huge batch does not shrink"


def test_a_shrink_onnxruntime_refuses_is_logged_once_and_loses_no_vector(
    tiny_exports: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """The arena names the shrink passes ("gpu:N") are onnxruntime's to accept or refuse; a refusal
    comes after the call's last batch and must not cost the call its vectors."""
    tuning = Tuning(reuse_buffers=True, shrink_above_tokens=100)
    folder = tiny_exports[("router", "fp32")]
    texts = [f"python, sql, docker {i}, " * 20 for i in range(12)]
    expected = Encoder.load(folder, device="cpu", precision="fp32").encode(texts, batch_size=4)
    encoder = Encoder.load(folder, device="cpu", precision="fp32", tuning=tuning)
    encoder.chain._shrink = ort.RunOptions()
    encoder.chain._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "gpu:7")
    with caplog.at_level("WARNING", logger="jobbert_onnx"):
        for _ in range(2):
            assert_close(encoder.encode(texts, batch_size=4), expected, 1e-6, "after a refused shrink")
    refusals = [r for r in caplog.records if "refused to shrink" in r.getMessage()]
    assert len(refusals) == 1 and "shrink_above_tokens=0" in refusals[0].getMessage()
    assert encoder.chain.shrink_failure is not None and encoder.chain.release("anchor") is False


def test_outputs_stay_in_the_devices_memory(encoder_fp32: Encoder) -> None:
    tokenized = encoder_fp32.tokenizer.tokenize(["Software Engineer", "python, sql"])
    batch = encoder_fp32.tokenizer.pad(tokenized, np.arange(2))
    outputs = encoder_fp32.chain.outputs(batch, "anchor")
    assert list(outputs) == [TOKEN_EMBEDDINGS, SENTENCE_EMBEDDING, EMBEDDING]
    width = batch.input_ids.shape[1]
    assert [value.shape() for value in outputs.values()] == [[2, width, 32], [2, 32], [2, 1024]]
    assert all(value.device_name().lower() == "cpu" for value in outputs.values())


@pytest.mark.parametrize(("texts", "threads"), [(["Koch"], 0), (["Koch", "python, sql, docker, " * 8], 1)])
def test_tokenizing_ahead_starts_a_thread_only_for_two_batches(
    tiny_exports: dict, monkeypatch: pytest.MonkeyPatch, texts: list[str], threads: int
) -> None:
    started = []
    real = encoder_module.prefetch

    def counting(items: Iterator, depth: int = 2) -> Iterator:  # type: ignore[type-arg]
        started.append(1)
        return real(items, depth)

    monkeypatch.setattr(encoder_module, "prefetch", counting)
    tuning = Tuning(overlap=True)
    encoder = Encoder.load(tiny_exports[("router", "fp32")], device="cpu", precision="fp32", tuning=tuning)
    encoder.encode(texts, batch_size=4)
    assert len(started) == threads


def test_tuning_defaults_are_decided_per_device() -> None:
    cpu, cuda = Tuning().resolve("cpu", 64), Tuning().resolve("cuda", 64)
    assert (cpu.buckets, cpu.pad_to_bucket, cpu.overlap, cpu.reuse_buffers) == (
        (8, 12, 16, 24, 32, 48, 64),
        False,
        False,
        False,
    )
    assert (cuda.buckets, cuda.pad_to_bucket, cuda.overlap, cuda.reuse_buffers) == (
        (6, 8, 10, 12, 14, 16, 20, 24, 32, 48, 64),
        True,
        True,
        True,
    )
    assert (cpu.batch_size, cpu.token_budget, cuda.batch_size, cuda.token_budget) == (32, None, 4096, 32768)
    assert cpu.cuda_graphs is False and cpu.shrink_above_tokens == cuda.shrink_above_tokens == 32768
    bigger = Tuning(token_budget=65536).resolve("cuda", 64)
    assert bigger.shrink_above_tokens == 65536, "batches the budget allows never shrink the arenas"
    assert Tuning(token_budget=65536, shrink_above_tokens=1000).resolve("cuda", 64).shrink_above_tokens == 1000
    graphs = Tuning(cuda_graphs=True, reuse_buffers=False, pad_to_bucket=False).resolve("cuda", 64)
    assert graphs.reuse_buffers and graphs.pad_to_bucket, "CUDA graphs need fixed buffers and bucket widths"
    assert Tuning(buckets=()).resolve("cpu", 64).buckets == ()
    assert Tuning(buckets=(16, 100)).resolve("cpu", 64).buckets == (16, 64)


def test_cudas_default_batches_hold_a_token_budget_and_pad_real_titles_little(tiny_exports: dict) -> None:
    """The CUDA defaults, planned on the CPU over real titles and skill lists with the genuine tokenizer:
    no batch above 32,768 padded tokens, titles padded to at most 1.10x their tokens (the old
    (8, 16, 32, 64) buckets gave 1.38x), skill lists in batches of 512."""
    from jobbert_onnx.runtime.batching import plan_batches
    from jobbert_onnx.samples import LANGUAGES, skill_lists, titles

    cuda = Tuning().resolve("cuda", 64)
    encoder = Encoder.load(tiny_exports[("router", "fp32")], device="cpu", precision="fp32")
    for texts, most_padding in (
        ([t for language in LANGUAGES for t in titles(language)], 1.10),
        ([t for language in ("en", "de", "es") for t in skill_lists(language, 600, 40)], 1.02),
    ):
        lengths = encoder.tokenizer.tokenize(texts).lengths
        plans = plan_batches(lengths, int(cuda.batch_size or 0), cuda.buckets, cuda.token_budget)
        padded = sum(plan.width * plan.height for plan in plans)
        assert max(plan.width * plan.height for plan in plans) <= 32768
        assert padded / lengths.sum() <= most_padding, padded / lengths.sum()
        assert sorted(np.concatenate([plan.rows for plan in plans]).tolist()) == list(range(len(texts)))
    assert max(plan.height for plan in plans) == 512


def test_a_call_without_a_batch_size_takes_the_tunings(tiny_exports: dict) -> None:
    folder = tiny_exports[("router", "fp32")]
    encoder = Encoder.load(folder, device="cpu", precision="fp32", tuning=Tuning(batch_size=7, buckets=()))
    log = _RunLog(encoder)
    texts = [f"Koch {i}" for i in range(20)]
    got = encoder.encode(texts)
    assert len(log.ids) == 3, "20 texts in batches of 7"
    encoder.encode(texts, batch_size=20)
    assert len(log.ids) == 4, "a batch size given wins"
    assert_close(got, Encoder.load(folder, device="cpu", precision="fp32").encode(texts), 1e-6, "same vectors")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, or None for the device.s default"):
        encoder.encode(texts, batch_size=0)


@pytest.mark.parametrize(
    ("tuning", "message"),
    [
        (Tuning(cuda_graphs=True), "cuda_graphs=True needs device='cuda'"),
        (Tuning(batch_size=0), "batch_size must be a positive integer"),
        (Tuning(token_budget=0), "token_budget must be a positive integer"),
        (Tuning(shrink_above_tokens=-5), "shrink_above_tokens must be a positive integer"),
        (Tuning(buckets="auto"), "buckets must be a list of lengths"),  # type: ignore[arg-type]
        (Tuning(host_output=True, reuse_buffers=False), "host_output=True keeps its host buffers with the reused"),
    ],
)
def test_bad_tuning_is_refused(tuning: Tuning, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tuning.resolve("cpu", 64)
    if "cuda_graphs" not in message:
        with pytest.raises(ValueError, match=message):
            tuning.resolve("cuda", 64)


def test_unknown_tuning_options_are_named() -> None:
    with pytest.raises(ValueError, match="unknown tuning option cuda_graph; known: batch_size, buckets"):
        Tuning.from_options({"cuda_graph": True})


@pytest.mark.parametrize(("reuse", "host_output"), [(False, False), (True, False), (None, True)])
def test_batches_in_flight_give_the_same_vectors_in_order(
    tiny_exports: dict, reuse: bool | None, host_output: bool
) -> None:
    """Each run thread writes its batch's vectors before its buffers (and, with `host_output`,
    the one host array of their shape) run again: 60 texts of varied lengths in batches of 5,
    three in flight, many batches sharing a shape, give what one batch at a time gives."""
    folder = tiny_exports[("router", "fp32")]
    texts = [*parity_texts(), *(f"python, sql, docker {i}, " * (i % 9) for i in range(60))]
    one = Encoder.load(folder, device="cpu", precision="fp32", tuning=Tuning(in_flight=1))
    tuning = Tuning(in_flight=3, reuse_buffers=reuse, host_output=host_output)
    two = Encoder.load(folder, device="cpu", precision="fp32", tuning=tuning)
    threads: set[str] = set()
    real = two.chain.run_into

    def run_into(batch: object, route: str, out: np.ndarray, rows: np.ndarray) -> None:
        threads.add(threading.current_thread().name)
        real(batch, route, out, rows)  # type: ignore[arg-type]

    two.chain.run_into = run_into  # type: ignore[method-assign]
    for task in ("anchor", "positive"):
        assert np.array_equal(two.encode(texts, task=task, batch_size=5), one.encode(texts, task=task, batch_size=5))
    if host_output:
        assert two.chain.host is not None and two.chain.host.failure == "not on CUDA"
        assert two.chain.host.pinned_bytes == 0
    assert len(threads) > 1 and all(name.startswith("jobbert-onnx-run") for name in threads)
    threads.clear()
    two.encode("Koch")
    assert threads == {threading.current_thread().name}, "one batch runs on the caller's thread, no hand-off"


def test_a_failing_batch_in_flight_fails_the_call_and_leaves_nothing_running(tiny_exports: dict) -> None:
    encoder = Encoder.load(tiny_exports[("router", "fp32")], device="cpu", precision="fp32", tuning=Tuning(in_flight=2))
    real = encoder.chain.run_into
    started = []

    def run_into(batch: object, route: str, out: np.ndarray, rows: np.ndarray) -> None:
        started.append(1)
        if len(started) == 3:
            raise RuntimeError("the device went away")
        real(batch, route, out, rows)  # type: ignore[arg-type]

    encoder.chain.run_into = run_into  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="the device went away"):
        encoder.encode([f"Koch {i}" for i in range(40)], batch_size=4)
    count = len(started)
    assert encoder._pool is not None
    encoder._pool.submit(lambda: None).result()  # the pool still works, and nothing more started
    assert len(started) == count <= 4
    assert Tuning(in_flight=4, cuda_graphs=True).resolve("cuda", 64).in_flight == 1, "CUDA graphs take turns"
    assert (Tuning().resolve("cuda", 64).in_flight, Tuning().resolve("cpu", 64).in_flight) == (2, 1)
