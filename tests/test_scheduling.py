"""Variants, batch planning, buffer reuse and tokenize-ahead: faster paths give the same vectors."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close, parity_texts

from jobbert_onnx import Encoder, ManifestError, Tuning, samples
from jobbert_onnx.manifest import read_manifest
from jobbert_onnx.runtime import encoder as encoder_module
from jobbert_onnx.runtime.batching import check_buckets, plan_batches
from jobbert_onnx.runtime.prefetch import prefetch


def _mixed_texts() -> list[str]:
    return parity_texts() + samples.titles("zh")[:40] + samples.skill_lists("de", count=20, skills_per_list=12)


def test_default_variant_per_device(tiny_exports: dict) -> None:
    router = read_manifest(tiny_exports[("router", "fp32")])
    assert router.choose_variant("cpu").precision == "int8"
    assert router.choose_variant("cuda").precision == "fp16"
    with pytest.warns(RuntimeWarning, match="fp16 variant on the CPU"):
        assert router.choose_variant("cpu", "fp16").precision == "fp16"
    legacy = read_manifest(tiny_exports[("legacy-asym", "fp32")])
    assert legacy.choose_variant("cpu").precision == "fp32"
    assert legacy.choose_variant("cuda").precision == "fp32"
    assert Encoder.load(tiny_exports[("router", "int8")], device="cpu").precision == "int8"


def test_variant_errors_name_the_fix(tiny_exports: dict) -> None:
    with pytest.raises(ManifestError, match=r"has no 'int8' variant \(it has: fp32\).*--precision int8"):
        Encoder.load(tiny_exports[("legacy-asym", "fp32")], device="cpu", precision="int8")
    router = read_manifest(tiny_exports[("router", "fp32")])
    with pytest.raises(ManifestError, match="int8 variant runs on the CPU only.*on cuda use one of: fp16, fp32"):
        router.choose_variant("cuda", "int8")


def test_older_schema_is_refused(tiny_exports: dict, tmp_path: Path) -> None:
    copy = tmp_path / "export"
    shutil.copytree(tiny_exports[("legacy-asym", "fp32")], copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["schema_version"] = 1
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="schema 1, from an older jobbert-onnx.*export the model again"):
        Encoder.load(copy, device="cpu")


def _check_plans(lengths: np.ndarray, plans: list, batch_size: int) -> None:
    rows = np.concatenate([plan.rows for plan in plans])
    assert sorted(rows.tolist()) == list(range(len(lengths))), "every row exactly once"
    for plan in plans:
        assert 1 <= len(plan.rows) <= min(batch_size, plan.height)
        assert lengths[plan.rows].max() <= plan.width


def test_plans_without_buckets_pad_to_the_longest_row() -> None:
    lengths = np.random.default_rng(0).integers(3, 65, size=301)
    plans = plan_batches(lengths, 32)
    _check_plans(lengths, plans, 32)
    assert all(plan.width == lengths[plan.rows].max() for plan in plans)
    assert [len(p.rows) for p in plans] == [32] * 9 + [13]


def test_plans_with_buckets_and_token_budget() -> None:
    lengths = np.random.default_rng(1).integers(3, 65, size=500)
    buckets = check_buckets([16, 8, 32], 64)
    assert buckets == (8, 16, 32, 64)
    plans = plan_batches(lengths, 256, buckets, token_budget=1024)
    _check_plans(lengths, plans, 256)
    for plan in plans:
        assert plan.width in buckets
        assert len(plan.rows) * plan.width <= 1024
        smaller = [b for b in buckets if b < plan.width]
        assert not smaller or lengths[plan.rows].max() > smaller[-1], "a batch sits in the smallest bucket it fits"
    tight = plan_batches(lengths, 256, buckets, token_budget=1024, pad_to_bucket=False)
    assert [p.rows.tolist() for p in tight] == [p.rows.tolist() for p in plans]
    assert all(p.width == lengths[p.rows].max() for p in tight)
    rounded = plan_batches(lengths, 256, buckets, token_budget=1024, round_rows=True)
    _check_plans(lengths, rounded, 256)
    assert [p.rows.tolist() for p in rounded] == [p.rows.tolist() for p in plans]
    for plan in rounded:
        capacity = 1024 // plan.width
        power_of_two = plan.height & (plan.height - 1) == 0
        assert len(plan.rows) <= plan.height <= capacity and (power_of_two or plan.height == capacity)
        assert plan.height < 2 * len(plan.rows), "never padded to more than twice its rows"


def test_rounded_rows_give_one_title_a_one_row_batch() -> None:
    assert [p.height for p in plan_batches(np.array([5]), 32, (8, 64), round_rows=True)] == [1]
    heights = {p.height for n in range(1, 100) for p in plan_batches(np.full(n, 5), 32, (8, 64), round_rows=True)}
    assert heights == {1, 2, 4, 8, 16, 32}, "few shapes, whatever the count"


def test_bad_buckets_are_refused() -> None:
    with pytest.raises(ValueError, match="positive sequence lengths"):
        check_buckets([0, 16], 64)


def test_padding_gathers_every_chosen_row_whole_and_in_order(encoder_fp32: Encoder) -> None:
    """`pad` gathers rows from one flat table; each padded row must be its text's ids, then pad ids."""
    tokenizer = encoder_fp32.tokenizer
    texts = ["", "Koch", "python, sql, " * 30, "高级软件开发人员", "Data Scientist", "a"]
    tokenized = tokenizer.tokenize(texts)
    rng = np.random.default_rng(0)
    for _ in range(50):
        rows = rng.choice(len(texts), size=int(rng.integers(1, len(texts) + 1)), replace=False)
        width = int(tokenized.lengths[rows].max()) + int(rng.integers(0, 3))
        batch = tokenizer.pad(tokenized, rows, width=width, height=len(rows) + int(rng.integers(0, 3)))
        for out_row, row in enumerate(rows):
            ids = tokenized.ids[row]
            assert batch.input_ids[out_row].tolist() == ids + [tokenizer.pad_id] * (width - len(ids))
            assert batch.attention_mask[out_row].tolist() == [1] * len(ids) + [0] * (width - len(ids))


def test_extra_padding_rows_do_not_change_real_rows(encoder_fp32: Encoder) -> None:
    tokenized = encoder_fp32.tokenizer.tokenize(["Koch", "python, sql, data pipelines"])
    rows = np.array([1, 0])
    plain = encoder_fp32.chain.run(encoder_fp32.tokenizer.pad(tokenized, rows), "anchor")
    padded_batch = encoder_fp32.tokenizer.pad(tokenized, rows, width=16, height=5)
    assert padded_batch.input_ids.shape == (5, 16)
    empty = encoder_fp32.tokenizer.tokenize([""]).ids[0]
    assert (padded_batch.attention_mask[2:].sum(1) == len(empty)).all(), "filler rows are an empty text, never 0 keys"
    assert (padded_batch.input_ids[2:, : len(empty)] == empty).all()
    padded = encoder_fp32.chain.run(padded_batch, "anchor")
    assert_close(padded[:2], plain, 1e-5, "real rows of a padded batch")
    assert np.isfinite(padded).all()


@pytest.mark.parametrize(
    "options",
    [
        {"buckets": ()},
        {"buckets": (8, 16, 32, 64), "pad_to_bucket": True},
        {"buckets": (16, 64), "token_budget": 200},
        {"reuse_buffers": True},
        {"overlap": True, "pad_to_bucket": True, "reuse_buffers": True},
    ],
)
def test_scheduling_options_give_the_same_vectors(
    tiny_exports: dict, encoder_fp32: Encoder, options: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encoder_module, "TOKENIZE_CHUNK", 37)  # several chunks even for a small input
    texts = _mixed_texts()
    encoder = Encoder.load(
        tiny_exports[("router", "fp32")], device="cpu", precision="fp32", tuning=Tuning.from_options(options)
    )
    for task in ("anchor", "positive"):
        expected = encoder_fp32.encode(texts, task=task, batch_size=16)
        assert_close(encoder.encode(texts, task=task, batch_size=16), expected, 1e-5, f"{options} {task}")


def test_reused_buffers_are_safe_across_threads(tiny_exports: dict, encoder_fp32: Encoder) -> None:
    encoder = Encoder.load(
        tiny_exports[("router", "fp32")], device="cpu", precision="fp32", tuning=Tuning(reuse_buffers=True)
    )
    texts = _mixed_texts()
    jobs = [(texts[i::4], ("anchor", "positive")[i % 2]) for i in range(8)]
    expected = [encoder_fp32.encode(t, task=task, batch_size=8) for t, task in jobs]
    results: dict[int, np.ndarray] = {}

    def work(index: int) -> None:
        for _ in range(3):
            results[index] = encoder.encode(jobs[index][0], task=jobs[index][1], batch_size=8)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, want in enumerate(expected):
        assert_close(results[index], want, 1e-5, f"thread {index}")


def test_cuda_graphs_need_cuda(tiny_exports: dict) -> None:
    with pytest.raises(ValueError, match="cuda_graphs=True needs device='cuda'"):
        Encoder.load(tiny_exports[("router", "fp16")], device="cpu", tuning=Tuning(cuda_graphs=True))


def test_prefetch_keeps_order_and_raises_producer_errors() -> None:
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():  # type: ignore[no-untyped-def]
        yield 1
        raise KeyError("broken producer")

    got = []
    with pytest.raises(KeyError, match="broken producer"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1]


def test_prefetch_stops_its_thread_when_the_consumer_stops() -> None:
    produced = []

    def endless():  # type: ignore[no-untyped-def]
        n = 0
        while True:
            produced.append(n)
            yield n
            n += 1

    stream = prefetch(endless(), depth=2)
    assert [next(stream) for _ in range(5)] == list(range(5))
    stream.close()  # joins the producer
    count = len(produced)
    assert count <= 5 + 2 + 1
    assert not any(t.name == "jobbert-onnx-prefetch" for t in threading.enumerate())


def test_spinning_reaches_every_session(tiny_exports: dict) -> None:
    for spinning, expected in ((False, "0"), (True, "1")):
        tuning = Tuning(spinning=spinning)
        encoder = Encoder.load(tiny_exports[("router", "fp32")], device="cpu", precision="fp32", tuning=tuning)
        sessions = [encoder.chain.encoder, encoder.chain.pooling, *encoder.chain.heads.values()]
        for session in sessions:
            assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == expected
