"""Fold a GPU proof's results into the repository: `python -m benchmarks.gpu.fold PROOF_DIR`.

- copies the raw files to benchmarks/results/gpu/<date>-<gpu>/;
- rewrites the GPU section of benchmarks/RESULTS.md (between its gpu-proof markers);
- rewrites the predictions table of benchmarks/GPU-NOTES.md (between its markers): for each
  prediction the GPU readiness work made, what this run observed.

Text outside the markers is left as it is. A rehearsal (CPU) run is refused unless
``--allow-rehearsal``: its numbers are not GPU numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.gpu.summary import GRAPHS, OURS, targets

ROOT = Path(__file__).resolve().parents[2]
START, END = "<!-- gpu-proof:start -->", "<!-- gpu-proof:end -->"


def _step(facts: dict[str, Any], name: str) -> dict[str, Any]:
    step: dict[str, Any] = facts["steps"].get(name, {})
    return step


def _contender(bench: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    for result in (bench or {}).get("contenders", []):
        if result.get("contender") == name and "error" not in result:
            found: dict[str, Any] = result
            return found
    return None


def _cuda(facts: dict[str, Any], bench: dict[str, Any] | None) -> str:
    env = _step(facts, "environment").get("facts", {})
    if env.get("cuda_blocker"):
        return f"CUDA could not be used: {env['cuda_blocker']}"
    libraries = ", ".join(Path(p).name for p in env.get("cuda_libraries_loaded", [])) or "none listed"
    return f"CUDA loaded ({libraries}); the proof ran with JOBBERT_ONNX_REQUIRE_CUDA=1"


def _fp16(facts: dict[str, Any], bench: dict[str, Any] | None) -> str:
    def heads(found: dict[str, Any]) -> str:
        return "; ".join(f"{head} min {f['min_cosine']:.6f} mean {f['mean_cosine']:.6f}" for head, f in found.items())

    variant = _step(facts, "model").get("validation", {}).get("fp16")
    parts = [f"random weights, validated on {variant['device']}: {heads(variant['heads'])}"] if variant else []
    outliers = _step(facts, "outliers")
    fp16 = outliers.get("fp16")
    if isinstance(fp16, dict):
        parts.append(f"outlier replica, on {fp16['device']}: {heads(fp16['heads'])}")
        packed = fp16.get("packed", {})
        parts.append(f"packed: {heads(packed['heads'])}" if packed.get("heads") else f"packed: {packed.get('note')}")
    elif outliers:
        parts.append(f"outlier replica: {outliers.get('status')}")
    return "; ".join(parts) or "not measured"


def _nan(facts: dict[str, Any], bench: dict[str, Any] | None) -> str:
    attention = _step(facts, "placement").get("placement", {}).get("attention", {})
    counts = ", ".join(f"{form}: {seen['nonfinite_at_padded_positions']}" for form, seen in attention.items())
    failed = _step(facts, "tests").get("tests", {}).get("failed", [])
    nan_test = "failed" if any("padded_positions" in name for name in failed) else "passed or not run"
    return (
        f"non-finite values at padded positions of the encoder output ({counts or 'not measured'}); NaN test {nan_test}"
    )


def _graphs(facts: dict[str, Any], bench: dict[str, Any] | None) -> str:
    graphs = _step(facts, "capture").get("cuda_graphs", {})
    if graphs.get("status") != "ok":
        return graphs.get("status", "not measured")
    shapes = graphs["shapes"]
    bad = [shape for shape, seen in shapes.items() if not seen["captured"]]
    return f"{len(shapes) - len(bad)} of {len(shapes)} shapes captured, first replays matched" + (
        f"; failed: {', '.join(bad)}" if bad else ""
    )


def _memory(facts: dict[str, Any], bench: dict[str, Any] | None) -> str:
    peaks = [
        f"{r['contender']}: {r['peak_gpu_mib']:,.0f} MiB"
        for r in (bench or {}).get("contenders", [])
        if "error" not in r and r.get("peak_gpu_mib") is not None
    ]
    return "; ".join(peaks) or "not measured"


def _overhead(facts: dict[str, Any], bench: dict[str, Any] | None) -> str:
    parts = []
    for name in (OURS, GRAPHS):
        result = _contender(bench, name)
        if result:
            parts.append(f"{name}: batch-1 p50 {result['workloads']['titles']['latency']['p50_ms']:.3f} ms")
    split = _step(facts, "profile").get("profile", {}).get("split_ms", {}).get("one title")
    if split:
        parts.append("one title: " + ", ".join(f"{k} {v:.3f} ms" for k, v in split.items()))
    return "; ".join(parts) or "not measured"


def _kernel(facts: dict[str, Any], bench: dict[str, Any] | None) -> str:
    attention = _step(facts, "placement").get("placement", {}).get("attention", {})
    seen = "; ".join(f"{form}: {' / '.join(v['kernel_lines'])}" for form, v in attention.items())
    return seen or "not measured"


def _placement(facts: dict[str, Any], bench: dict[str, Any] | None) -> str:
    graphs = _step(facts, "placement").get("placement", {}).get("graphs", {})
    return "; ".join(f"{g}: CPU {v['cpu_nodes']}, Memcpy {v['memcpy_nodes']}" for g, v in graphs.items()) or "-"


CHAINED = "jobbert-onnx fp16, chained graphs"


def _versus(name: str, baseline: str = OURS) -> Observe:
    """Observe a contender against `baseline` (the CUDA default unless named): texts/s per workload,
    at each batch size both ran."""
    called = "the default" if baseline == OURS else "the chained graphs"

    def observe(facts: dict[str, Any], bench: dict[str, Any] | None) -> str:
        tried, default = _contender(bench, name), _contender(bench, baseline)
        if tried is None or default is None:
            failed = next((r for r in (bench or {}).get("contenders", []) if r.get("contender") == name), None)
            return f"not measured ({failed['error']})" if failed else "not measured"
        parts = []
        for workload, row in tried["workloads"].items():
            for size, point in row["throughput"].items():
                base = default["workloads"].get(workload, {}).get("throughput", {}).get(size)
                if point and base:
                    ratio = point["texts_per_s"] / base["texts_per_s"]
                    parts.append(
                        f"{workload.replace('_', ' ')} at {size}: {point['texts_per_s']:,.0f} vs "
                        f"{base['texts_per_s']:,.0f} texts/s ({ratio:.2f}x {called})"
                    )
        extra = f"; host buffers {tried['host_buffers']}" if "host_buffers" in tried else ""
        return ("; ".join(parts) or f"no batch size in common with {called}") + extra

    return observe


Observe = Callable[[dict[str, Any], dict[str, Any] | None], str]
PREDICTIONS: list[tuple[str, str, Observe]] = [
    (
        "No silent CPU",
        "onnxruntime-gpu lists the CUDA provider where its CUDA 13 / cuDNN 9 libraries do not load, and runs on the "
        "CPU. Now the missing library is named, and JOBBERT_ONNX_REQUIRE_CUDA / --require-cuda make it a failure.",
        _cuda,
    ),
    (
        "fp16 fidelity",
        "The CPU provider computes fp16 nodes in fp32 between casts, so fp16 cosines measured on the CPU (min "
        "0.9999995) say nothing of fp16 arithmetic; a GPU run gives the real figures.",
        _fp16,
    ),
    (
        "NaN at padded positions",
        "On sm_90 another attention kernel runs and may leave NaN at padded positions; NaN x 0 in the old pooling "
        "would reach the vectors. Pooling now selects real tokens (Where), filler rows hold <s></s>.",
        _nan,
    ),
    (
        "CUDA graphs",
        "Runs without gpu_graph_id captured under the default id on fresh buffers; one title ran a full batch. Now "
        "every run carries an id (-1: none), rows round to powers of two, at most 64 graphs, each first replay is "
        "checked against a run without a graph.",
        _graphs,
    ),
    (
        "Memory on CUDA",
        "Python-made CUDA buffers come from an arena that never shrinks; huge batches now use session-allocated "
        "outputs and one arena shrink per call.",
        _memory,
    ),
    (
        "Per-call overhead",
        "A thread per encode() call and cold per-thread buffers in the server cost latency; the thread now starts "
        "only for two batches or more, and the server warms up on its encoding thread.",
        _overhead,
    ),
    (
        "Attention kernel",
        "From onnxruntime's source: with the [batch] lengths mask (the optimizer's default) only TensorRT's fused "
        "runner applies, and it has no sm_90 kernels, so H100/H200 run unfused attention, as with the 2D mask. The "
        "[3*batch+2] lengths-and-starts mask (fp16's default now) makes memory-efficient attention eligible.",
        _kernel,
    ),
    (
        "Placement",
        "Shape arithmetic of the position ids may stay on the CPU and add Memcpy nodes (which also stop CUDA graph "
        "capture).",
        _placement,
    ),
    # The second readiness pass: each piece of the CUDA path against today's path, in the same run.
    (
        "One run per batch",
        "Three runs and three synchronizations per batch cost host time the device waits for; the merged graph "
        "(the default) runs a batch in one. Shown below as the chained graphs against the default.",
        _versus(CHAINED),
    ),
    (
        "Attention-mask forms",
        "The [3*batch+2] lengths-and-starts mask reaches memory-efficient attention where the [batch] lengths and "
        "the 2D mask run unfused attention on sm_90. Shown as each other form against the default form, both on the "
        "chained graphs (the copies have no merged graph), so that only the mask differs.",
        lambda facts, bench: "; ".join(
            f"{form}: {_versus(f'{CHAINED}, mask {form}', CHAINED)(facts, bench)}" for form in ("1D lengths", "2D")
        ),
    ),
    (
        "Two batches in flight",
        "With one batch at a time the device idles while the host copies in, launches and scatters; two run "
        "threads (the default) overlap them. Shown as one batch in flight against the default.",
        _versus("jobbert-onnx fp16, one batch in flight"),
    ),
    (
        "Token budget and fine buckets",
        "Batches of 32,768 padded tokens in buckets of 2 up to 16 pad real titles to 1.08x their tokens where "
        "8/16/32/64 without a budget padded them to 1.38x. Shown as the coarse buckets against the default.",
        _versus("jobbert-onnx fp16, buckets 8/16/32/64, no token budget"),
    ),
    (
        "Page-locked host output",
        "A batch's vectors copied off the device into page-locked memory are one DMA, where pageable memory takes "
        "the driver's staged copy and a fresh array; worth a few percent at 4,096 titles a batch.",
        _versus("jobbert-onnx fp16, vectors into page-locked host buffers"),
    ),
    (
        "Padding-free encoder",
        "RemovePadding and PackedAttention compute on real tokens only: skill lists barely pad, titles pad least "
        "with the fine buckets, so the gain may be small against the padded fp16 encoder.",
        _versus("jobbert-onnx fp16, padding removed (packed)"),
    ),
]


def _replace(text: str, block: str) -> str:
    section = f"{START}\n{block.rstrip()}\n{END}"
    if START in text and END in text:
        return re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    return text.rstrip() + "\n\n" + section + "\n"


def fold(proof_dir: Path, root: Path = ROOT, allow_rehearsal: bool = False) -> Path:
    """Copy the raw files and rewrite the GPU sections; returns the raw folder."""
    facts = json.loads((proof_dir / "proof.json").read_text())
    rehearsal = facts["mode"].startswith("rehearsal")
    if rehearsal and not allow_rehearsal:
        raise SystemExit(f"{proof_dir} holds a rehearsal on the CPU, not GPU results; nothing folded")
    env = facts["steps"].get("environment", {}).get("facts", {})
    card = (env.get("gpu") or "no GPU").split(",")[0].strip()
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    raw = root / "benchmarks" / "results" / "gpu" / f"{facts['started'][:10]}-{slug}"
    raw.mkdir(parents=True, exist_ok=True)
    for path in proof_dir.iterdir():
        if path.is_file():
            shutil.copy2(path, raw / path.name)
    bench_path = next(proof_dir.glob("bench-*.json"), None)
    bench = json.loads(bench_path.read_text()) if bench_path else None
    where = raw.relative_to(root / "benchmarks")
    header = f"## GPU: {card} ({facts['mode']} proof, {facts['started'][:10]}; raw files in `{where}/`)"
    results_block = [header, "", "| target | measured | verdict |", "|---|---|---|"]
    results_block += [f"| {t} | {m} | {v} |" for t, m, v in targets(bench, rehearsal)]
    table = next(proof_dir.glob("bench-*.md"), None)
    if table is not None:
        results_block += ["", table.read_text()]
    results = root / "benchmarks" / "RESULTS.md"
    results.write_text(_replace(results.read_text() if results.is_file() else "", "\n".join(results_block)))
    notes_block = [
        f"Observed on {card}, {facts['started'][:10]} ({facts['mode']} proof; raw files in `{where}/`).",
        "",
        "| | predicted | observed |",
        "|---|---|---|",
    ]
    notes_block += [f"| {name} | {said} | {observe(facts, bench)} |" for name, said, observe in PREDICTIONS]
    notes = root / "benchmarks" / "GPU-NOTES.md"
    notes.write_text(_replace(notes.read_text() if notes.is_file() else "# GPU notes\n", "\n".join(notes_block)))
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("proof_dir", type=Path, help="the OUT folder of scripts/gpu-proof.sh")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository to fold into")
    parser.add_argument("--allow-rehearsal", action="store_true", help="fold a CPU rehearsal (for tests)")
    args = parser.parse_args(argv)
    raw = fold(args.proof_dir, args.root, args.allow_rehearsal)
    print(f"folded {args.proof_dir} into {args.root / 'benchmarks'} (raw files: {raw})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
