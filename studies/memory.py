"""Memory over time: a soak of many encodes, and what one huge batch leaves behind.

    python -m studies.memory soak MODEL_DIR [--count 100000] [--precision int8]
    python -m studies.memory huge MODEL_DIR [--rows 2048] [--no-shrink]

Each prints one JSON object. `soak` encodes `count` calls of 1-16 texts of random
length (1-80 words from real titles and ESCO skills, so from a few tokens to
the 64-token cap) through random heads, after a warm-up of the same mix, and
samples the process's resident memory (VmRSS) 50 times. `huge` warms up with
small batches, runs one batch of `rows` full-length texts, and reports the
resident memory before, at the peak, and after.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobbert_onnx import Encoder, Tuning, samples


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory (or VmHWM: its peak) in MiB, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _words() -> list[str]:
    pool = [t for language in samples.LANGUAGES for t in samples.titles(language)]
    pool += [s for language in samples.SKILL_LANGUAGES for s in samples.skills(language)]
    return " ".join(pool).split()


def random_calls(count: int, seed: int) -> Iterator[tuple[list[str], str]]:
    """(texts, task) pairs: 1-16 texts of 1-80 words each, either head."""
    rng = random.Random(seed)
    words = _words()
    for _ in range(count):
        texts = [" ".join(rng.choices(words, k=rng.randint(1, 80))) for _ in range(rng.randint(1, 16))]
        yield texts, rng.choice(("anchor", "positive"))


def soak(model: Path, count: int, precision: str | None, warmup: int, seed: int) -> dict[str, Any]:
    encoder = Encoder.load(model, device="cpu", precision=precision)
    for texts, task in random_calls(warmup, seed + 1):
        encoder.encode(texts, task=task)
    baseline = rss_mib()
    samples_mib = []
    every = max(1, count // 50)
    started = time.perf_counter()
    texts_done = 0
    for done, (texts, task) in enumerate(random_calls(count, seed), start=1):
        encoder.encode(texts, task=task)
        texts_done += len(texts)
        if done % every == 0:
            samples_mib.append(round(rss_mib(), 1))
    return {
        "scenario": "soak",
        "model": str(model),
        "precision": encoder.precision,
        "calls": count,
        "texts": texts_done,
        "warmup_calls": warmup,
        "seconds": round(time.perf_counter() - started, 1),
        "baseline_mib": round(baseline, 1),
        "max_mib": max(samples_mib),
        "last_mib": samples_mib[-1],
        "max_growth": round(max(samples_mib) / baseline - 1, 4),
        "samples_mib": samples_mib,
    }


def huge(model: Path, rows: int, shrink: bool, precision: str | None) -> dict[str, Any]:
    # The same text repeated makes a batch of known shape: keep every copy (no dedup).
    tuning = Tuning(dedup=False) if shrink else Tuning(shrink_above_tokens=0, dedup=False)
    encoder = Encoder.load(model, device="cpu", precision=precision, tuning=tuning)
    long_text = " ".join(_words()[:200])
    for _ in range(5):
        encoder.encode([long_text] * 32, batch_size=32)
    before = rss_mib()
    encoder.encode([long_text] * rows, batch_size=rows)
    after = rss_mib()
    encoder.encode([long_text] * 32, batch_size=32)
    return {
        "scenario": "huge batch",
        "precision": encoder.precision,
        "rows": rows,
        "tokens": rows * encoder.max_seq_length,
        "shrink": shrink,
        "before_mib": round(before, 1),
        "peak_mib": round(rss_mib("VmHWM"), 1),
        "after_mib": round(after, 1),
        "after_next_small_batch_mib": round(rss_mib(), 1),
        "retained_mib": round(after - before, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    soak_parser = commands.add_parser("soak")
    soak_parser.add_argument("model", type=Path)
    soak_parser.add_argument("--count", type=int, default=100_000)
    soak_parser.add_argument("--warmup", type=int, default=2000)
    soak_parser.add_argument("--precision")
    soak_parser.add_argument("--seed", type=int, default=0)
    huge_parser = commands.add_parser("huge")
    huge_parser.add_argument("model", type=Path)
    huge_parser.add_argument("--rows", type=int, default=2048)
    huge_parser.add_argument("--no-shrink", action="store_true")
    huge_parser.add_argument("--precision")
    args = parser.parse_args(argv)
    if args.command == "soak":
        result = soak(args.model, args.count, args.precision, args.warmup, args.seed)
    else:
        result = huge(args.model, args.rows, not args.no_shrink, args.precision)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
