"""Reliability of `Encoder.encode`: arbitrary input, many threads, flat memory, bounded caches."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobbert_onnx import Encoder, Tuning
from jobbert_onnx.runtime.chain import MAX_SHAPES

ROOT = Path(__file__).resolve().parent.parent

# Characters that break naive text handling: zero-width and joiners, bidirectional
# controls, byte-order mark, combining marks, emoji (with ZWJ and skin tones), CJK,
# control characters, and whitespace of every kind.
SPECIAL = [
    "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff",
    "\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069", "\u200f",
    "\u0301", "\u0308", "\u20dd", "e\u0301",
    "\U0001f469\u200d\U0001f4bb", "\U0001f44d\U0001f3fd", "\U0001f1e9\U0001f1ea",
    "软件工程师", "護理師", "データ", "\x00", "\x07", "\x1b", "\x7f", "\u0085",
    " ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\u2029",
]  # fmt: skip
TEXT = st.lists(st.one_of(st.characters(exclude_categories=["Cs"]), st.sampled_from(SPECIAL)), max_size=80).map("".join)
WHITESPACE = st.text(alphabet=st.sampled_from([" ", "\t", "\n", "\u00a0", "\u3000", "\u2028", "\r"]), max_size=20)
TEXTS = st.lists(st.one_of(TEXT, WHITESPACE, st.just("")), min_size=1, max_size=10)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def encoder(tiny_exports: dict) -> Encoder:
    return Encoder.load(tiny_exports[("router", "fp32")], device="cpu", precision="fp32")


@SETTINGS
@given(texts=TEXTS, task=st.sampled_from(["anchor", "positive"]))
def test_any_unicode_gives_finite_deterministic_batch_invariant_vectors(
    encoder: Encoder, texts: list[str], task: str
) -> None:
    vectors = encoder.encode(texts, task=task)
    assert vectors.shape == (len(texts), 1024) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    np.testing.assert_array_equal(encoder.encode(texts, task=task), vectors)  # the same call, the same bits
    alone = np.stack([encoder.encode(text, task=task) for text in texts])
    np.testing.assert_allclose(alone, vectors, atol=1e-5, rtol=0)
    reversed_batch = encoder.encode(texts[::-1], task=task, batch_size=3)[::-1]
    np.testing.assert_allclose(reversed_batch, vectors, atol=1e-5, rtol=0)


@SETTINGS
@given(
    before=st.lists(TEXT, max_size=4),
    bad=st.text(min_size=0, max_size=10).map(lambda s: s + "\ud800" + s),
    after=st.lists(TEXT, max_size=4),
)
def test_lone_surrogates_are_refused_by_index_before_anything_runs(
    encoder: Encoder, before: list[str], bad: str, after: list[str]
) -> None:
    with pytest.raises(ValueError, match=rf"sentences\[{len(before)}\] holds a lone surrogate '\\ud800'"):
        encoder.encode([*before, bad, *after])


def test_one_megabyte_strings_are_truncated(encoder: Encoder) -> None:
    words = "Senior Softwareentwickler 软件工程师 Ingeniero de datos \u200d\U0001f469\u200d\U0001f4bb "
    huge = (words * (1_000_000 // len(words) + 1))[:1_000_000]
    vectors = encoder.encode([huge, "Koch"], task="positive")
    assert np.isfinite(vectors).all()
    # only the first 64 tokens count: the vector equals that of a 10,000-character prefix
    np.testing.assert_allclose(vectors[0], encoder.encode(huge[:10_000], task="positive"), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(encoder.encode("a" * 1_000_000), encoder.encode("a" * 1_000_000))


def test_ten_thousand_mixed_items(encoder: Encoder) -> None:
    rng = np.random.default_rng(0)
    pool = ["", " ", "\u200b", "Koch", "Software Engineer", "软件工程师", "python, sql, " * 30, "x" * 5000]
    pool.append("\U0001f600")
    texts = [pool[i] + str(i) if i % 3 else pool[i % len(pool)] for i in rng.integers(0, len(pool), 10_000)]
    vectors = encoder.encode(texts, batch_size=256)
    assert vectors.shape == (10_000, 1024) and np.isfinite(vectors).all()
    order = rng.permutation(len(texts))
    shuffled = encoder.encode([texts[i] for i in order], batch_size=64)
    np.testing.assert_allclose(shuffled, vectors[order], atol=1e-5, rtol=0)


@pytest.mark.parametrize("reuse_buffers", [False, True])
def test_twelve_threads_at_once_match_a_sequential_run(tiny_exports: dict, reuse_buffers: bool) -> None:
    folder = tiny_exports[("router", "fp32")]
    encoder = Encoder.load(folder, device="cpu", precision="fp32", tuning=Tuning(reuse_buffers=reuse_buffers))
    rng = np.random.default_rng(1)
    words = "Software Engineer Pflegefachkraft Ingeniero datos python sql docker 软件 工程师 Koch Küche".split()
    jobs = []
    for index in range(12):
        texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 70)))) for _ in range(int(rng.integers(1, 40)))]
        jobs.append((texts, ("anchor", "positive")[index % 2], int(rng.integers(1, 16))))
    expected = [encoder.encode(texts, task=task, batch_size=size) for texts, task, size in jobs]
    results: dict[int, list[np.ndarray]] = {i: [] for i in range(len(jobs))}
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def work(index: int) -> None:
        texts, task, size = jobs[index]
        try:
            start.wait()
            for _ in range(5):
                results[index].append(encoder.encode(texts, task=task, batch_size=size))
        except BaseException as error:  # reported below, with the thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, want in enumerate(expected):
        for got in results[index]:
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0, err_msg=f"thread {index}")


def test_reused_buffers_keep_a_bounded_number_of_shapes(tiny_exports: dict) -> None:
    encoder = Encoder.load(
        tiny_exports[("router", "fp32")], device="cpu", precision="fp32", tuning=Tuning(reuse_buffers=True)
    )
    for rows in range(1, 3 * MAX_SHAPES):
        encoder.encode([f"Data Analyst {i}" for i in range(rows)], batch_size=rows)
    assert encoder.chain.cached_shapes() == MAX_SHAPES


def test_huge_batches_run_outside_the_cached_buffers(tiny_exports: dict) -> None:
    folder = tiny_exports[("router", "fp32")]
    texts = [f"python, sql, docker {i}, " * 20 for i in range(40)]
    small_limit = Encoder.load(
        folder, device="cpu", precision="fp32", tuning=Tuning(reuse_buffers=True, shrink_above_tokens=100)
    )
    unlimited = Encoder.load(
        folder, device="cpu", precision="fp32", tuning=Tuning(reuse_buffers=True, shrink_above_tokens=0)
    )
    vectors = small_limit.encode(texts, batch_size=40)
    np.testing.assert_allclose(vectors, unlimited.encode(texts, batch_size=40), atol=1e-6)
    assert small_limit.chain.cached_shapes() == 0
    assert unlimited.chain.cached_shapes() == 1
    with pytest.raises(ValueError, match="shrink_above_tokens must be a positive integer"):
        Encoder.load(folder, device="cpu", tuning=Tuning(shrink_above_tokens=-1))


def _memory(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "studies.memory", *args], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_resident_memory_stays_flat_over_many_encodes(tiny_exports: dict) -> None:
    """The CI-sized soak (the 100,000-call run is in studies/HISTORY.md)."""
    result = _memory("soak", str(tiny_exports[("router", "fp32")]), "--count", "6000", "--warmup", "1500")
    assert result["max_growth"] <= 0.05, result


def test_one_huge_batch_does_not_keep_its_memory(tiny_exports: dict) -> None:
    folder = str(tiny_exports[("router", "fp32")])
    kept = _memory("huge", folder, "--rows", "4096", "--no-shrink")
    released = _memory("huge", folder, "--rows", "4096")
    assert kept["retained_mib"] > 100, f"the unshrunk arena should hold the batch's memory: {kept}"
    assert released["retained_mib"] < kept["retained_mib"] / 4, (kept, released)
