"""Encoder graphs alone, head to head on the CPU: the same input through each, interleaved, best of many.

Usage: python -m studies.graph_ab NAME=GRAPH.onnx [NAME=GRAPH.onnx ...] [--shapes 32x64,32x10,1x10] --out DIR

For comparing two forms of one encoder (a graph edit, another quantization) or
an encoder against a peer's, without tokenizing, pooling or heads. Every graph
gets the runtime's session options, the same random token ids per shape, and
runs in turn with the others, round after round, so drift on a shared machine
hits all alike; the best time of a graph is its least disturbed run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.machine import cpu_name
from jobbert_onnx.runtime.sessions import session_options

# About this many padded tokens run per graph per round; rounds are at least 4.
TOKENS_PER_ROUND = 8 * 32 * 64


def run(graphs: dict[str, Path], shapes: list[tuple[int, int]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for rows, width in shapes:
        ids = np.random.default_rng(0).integers(5, 200_000, size=(rows, width)).astype(np.int64)
        ids[:, 0], ids[:, -1] = 0, 2
        feeds, sessions = {}, {}
        for name, path in graphs.items():
            session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            if "token_type_ids" in {i.name for i in session.get_inputs()}:
                feed["token_type_ids"] = np.zeros_like(ids)
            session.run(None, feed)
            sessions[name], feeds[name] = session, feed
        times: dict[str, list[float]] = {name: [] for name in graphs}
        for _ in range(max(4, TOKENS_PER_ROUND // (rows * width))):
            for name, session in sessions.items():
                for _ in range(2):
                    start = time.perf_counter()
                    session.run(None, feeds[name])
                    times[name].append(time.perf_counter() - start)
        results[f"{rows}x{width}"] = {
            name: {"best_ms": min(t) * 1e3, "median_ms": statistics.median(t) * 1e3, "runs": len(t)}
            for name, t in times.items()
        }
        for name, figures in results[f"{rows}x{width}"].items():
            print(f"{rows}x{width} {name}: best {figures['best_ms']:.2f} ms, median {figures['median_ms']:.2f} ms")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.graph_ab", description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="+", help="NAME=PATH of an encoder graph with input_ids and attention_mask")
    parser.add_argument("--shapes", default="32x64,32x10,1x10", help="ROWSxTOKENS, comma-separated")
    parser.add_argument("--out", type=Path, required=True, help="folder for graph_ab.json")
    args = parser.parse_args(argv)
    graphs = {name: Path(path) for name, path in (item.split("=", 1) for item in args.graphs)}
    shapes = [(int(r), int(w)) for r, w in (shape.split("x") for shape in args.shapes.split(","))]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = {
        "command": "python -m studies.graph_ab " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": started,
        "cpu": cpu_name(),
        "onnxruntime": ort.__version__,
        "graphs": {name: str(path) for name, path in graphs.items()},
        "results": run(graphs, shapes),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "graph_ab.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
