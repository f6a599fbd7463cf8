"""What encoding each distinct text once is worth: `embed` on a Zipf-distributed title file.

    python -m studies.dedup EXPORT [--rows 40000] [--out studies/results/dedup]

HR data repeats itself: a dump of postings holds its most common titles thousands of
times. The workload draws `rows` titles from the 7,155 shipped ones (en/es/de/zh) with
Zipf-distributed frequencies (the title of rank r drawn with weight 1/r^s) and writes
them to a text file; `embed` then runs on it with the encoder's dedup on and off, in
alternation, and the rows/s of each are reported (median of `--repeats` runs). The
same is done on all-distinct input (the shipped titles once each), where the dedup can
only cost: that overhead is reported end to end and, because two cores time a few
percent apart from run to run, also as the time of the dedup step itself against the
time of the encode it precedes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import cpu_name
from jobbert_onnx import Tuning, samples
from jobbert_onnx.batch.embed import CHUNK_ROWS, EmbedJob, local_encoder, run_embed
from jobbert_onnx.runtime.encoder import distinct


def zipf_titles(rows: int, exponent: float, seed: int) -> list[str]:
    """`rows` titles drawn with weight 1/rank^exponent from the shipped titles, in a seeded order."""
    rng = random.Random(seed)
    pool = [t for language in samples.LANGUAGES for t in samples.titles(language)]
    rng.shuffle(pool)
    weights = [1.0 / (rank**exponent) for rank in range(1, len(pool) + 1)]
    return rng.choices(pool, weights=weights, k=rows)


def _embed_seconds(export: Path, texts: list[str], dedup: bool, folder: Path, precision: str | None) -> float:
    source = folder / "titles.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    output = folder / "vectors.npy"
    encode = local_encoder(str(export), "anchor", 32, "cpu", precision, Tuning(dedup=dedup))
    job = EmbedJob(model_dir=str(export), input=str(source), output=str(output), task="anchor", precision=precision)
    started = time.perf_counter()
    report = run_embed(job, encode, overwrite=True, log=lambda line: None)
    seconds = time.perf_counter() - started
    assert report.rows_out == len(texts)
    return seconds


def _dedup_step_share(export: Path, texts: list[str], precision: str | None) -> dict[str, float]:
    """Time of `distinct` (the dedup step) per chunk against the encode of that chunk."""
    from jobbert_onnx import Encoder

    encoder = Encoder.load(export, device="cpu", precision=precision, tuning=Tuning(dedup=False))
    chunk = texts[:CHUNK_ROWS]
    step = min(_timed(lambda: distinct(chunk)) for _ in range(20))
    encode = _timed(lambda: encoder.encode(chunk, task="anchor"))
    return {"chunk_rows": len(chunk), "dedup_step_ms": step * 1000, "encode_ms": encode * 1000, "share": step / encode}


def _timed(call: Any) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def run(export: Path, rows: int, exponent: float, repeats: int, precision: str | None) -> dict[str, Any]:
    zipf = zipf_titles(rows, exponent, seed=0)
    per_chunk = [len(set(zipf[i : i + CHUNK_ROWS])) for i in range(0, len(zipf), CHUNK_ROWS)]
    pool = [t for language in samples.LANGUAGES for t in samples.titles(language)]
    all_distinct = list(dict.fromkeys(pool))
    timings: dict[str, list[float]] = {"zipf on": [], "zipf off": [], "distinct on": [], "distinct off": []}
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        _embed_seconds(export, all_distinct[:2000], True, folder, precision)  # warm-up
        for _ in range(repeats):
            for dedup in (True, False):
                state = "on" if dedup else "off"
                timings[f"zipf {state}"].append(_embed_seconds(export, zipf, dedup, folder, precision))
                timings[f"distinct {state}"].append(_embed_seconds(export, all_distinct, dedup, folder, precision))
    median = {key: statistics.median(values) for key, values in timings.items()}
    return {
        "workload": {
            "rows": rows,
            "zipf_exponent": exponent,
            "distinct_rows": len(set(zipf)),
            "distinct_per_chunk": per_chunk,
            "chunk_rows": CHUNK_ROWS,
            "all_distinct_rows": len(all_distinct),
        },
        "seconds": timings,
        "rows_per_s": {
            "zipf, dedup on": rows / median["zipf on"],
            "zipf, dedup off": rows / median["zipf off"],
            "all distinct, dedup on": len(all_distinct) / median["distinct on"],
            "all distinct, dedup off": len(all_distinct) / median["distinct off"],
        },
        "zipf_speedup": median["zipf off"] / median["zipf on"],
        "all_distinct_overhead": median["distinct on"] / median["distinct off"] - 1,
        "dedup_step": _dedup_step_share(export, all_distinct, precision),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="an export folder")
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--zipf", type=float, default=1.0, help="the exponent s of the title frequencies")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", help="encoder variant (default: the fastest on the CPU)")
    parser.add_argument("--out", type=Path, help="write dedup.json here (default: print only)")
    args = parser.parse_args(argv)
    result = run(args.export, args.rows, args.zipf, args.repeats, args.precision)
    result["command"] = "python -m studies.dedup " + " ".join(argv or __import__("sys").argv[1:])
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "dedup.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
