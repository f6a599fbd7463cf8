"""Baseline: this runtime against sentence-transformers (PyTorch) on the same inputs, in one run.

    python benchmarks/baseline.py --model models/jobbert-v3-random --out benchmarks/results

Uses a full-size JobBERT-v3-shaped model (build one with
`jobbert-onnx random-model`; its weights are random, so the cosines measure
faithfulness to PyTorch, not accuracy). Exports fp32 and fp16 if not given,
then encodes real multilingual titles (anchor) and ESCO skill lists
(positive) with every contender, and writes JSON plus a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from jobbert_onnx import Encoder, samples
from jobbert_onnx.export import export_model
from jobbert_onnx.export.validate import row_cosines


def workloads(titles: int, skill_lists: int) -> dict[str, tuple[str, list[str]]]:
    """A seeded mix of en/es/de/zh titles, and comma-joined ESCO skill lists (most over 64 tokens)."""
    rng = random.Random(0)
    pool = [t for language in samples.LANGUAGES for t in samples.titles(language)]
    lists = [
        s
        for language in samples.SKILL_LANGUAGES
        for s in samples.skill_lists(language, count=skill_lists, skills_per_list=9, offset=rng.randrange(2000))
    ]
    return {
        "titles": ("anchor", rng.sample(pool, titles)),
        "skill_lists": ("positive", rng.sample(lists, skill_lists)),
    }


def timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[np.ndarray, list[float]]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, times


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(threads: int) -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": None,
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "torch": version("torch"),
        "sentence_transformers": version("sentence-transformers"),
        "transformers": version("transformers"),
        "threads": threads,
        "device": "cpu",
        "io_binding": True,
        "weights": "random (full-size JobBERT-v3 architecture)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="full-size sentence-transformers folder")
    parser.add_argument("--exports", type=Path, help="folder holding fp32/ and fp16/ exports (made if missing)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--titles", type=int, default=512)
    parser.add_argument("--skill-lists", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    from sentence_transformers import SentenceTransformer

    threads = torch.get_num_threads()
    exports = args.exports or args.model.parent / f"{args.model.name}-onnx"
    for precision in ("fp32", "fp16"):
        if not (exports / precision / "manifest.json").is_file():
            export_model(str(args.model), exports / precision, precision=precision, validate_device="cpu")

    reference = SentenceTransformer(str(args.model), device="cpu")
    contenders: dict[str, Callable[[list[str], str], np.ndarray]] = {
        "sentence-transformers (PyTorch fp32)": lambda t, task: reference.encode(
            t, task=task, batch_size=args.batch_size
        ),
    }
    encoders = {precision: Encoder.load(exports / precision, device="cpu") for precision in ("fp32", "fp16")}
    for precision, encoder in encoders.items():
        contenders[f"jobbert-onnx {precision} (CPU)"] = lambda t, task, e=encoder: e.encode(
            t, task=task, batch_size=args.batch_size
        )

    rows = []
    tokenizer = encoders["fp32"].tokenizer
    for workload, (task, texts) in workloads(args.titles, args.skill_lists).items():
        expected = reference.encode(texts, task=task, batch_size=args.batch_size)
        mean_tokens = float(tokenizer.tokenize(texts).lengths.mean())
        for name, encode in contenders.items():
            vectors, times = timed(lambda enc=encode, t=texts, k=task: enc(t, k), args.repeats)
            cos = row_cosines(vectors, expected)
            best = min(times)
            rows.append(
                {
                    "workload": workload,
                    "task": task,
                    "contender": name,
                    "texts": len(texts),
                    "mean_tokens": mean_tokens,
                    "batch_size": args.batch_size,
                    "texts_per_s": len(texts) / best,
                    "median_s": statistics.median(times),
                    "cosine_mean": float(cos.mean()),
                    "cosine_min": float(cos.min()),
                }
            )
            print(f"{workload:12s} {name:38s} {len(texts) / best:8.1f} texts/s  cos min {cos.min():.7f}", flush=True)

    result = {
        "environment": environment(threads),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "baseline-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    table = [
        "| workload | contender | tokens/text | texts/s | vs PyTorch | cosine mean | cosine min |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        base = next(
            r["texts_per_s"] for r in rows if r["workload"] == row["workload"] and r["contender"].startswith("sentence")
        )
        table.append(
            f"| {row['workload']} ({row['task']}) | {row['contender']} | {row['mean_tokens']:.1f} | "
            f"{row['texts_per_s']:.1f} | "
            f"{row['texts_per_s'] / base:.2f}x | {row['cosine_mean']:.7f} | {row['cosine_min']:.7f} |"
        )
    (args.out / "baseline-cpu.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
