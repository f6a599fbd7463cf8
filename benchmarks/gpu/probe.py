"""What the GPU proof asks of the machine, one question per subcommand, each printing one JSON object.

    python -m benchmarks.gpu.probe env
    python -m benchmarks.gpu.probe placement EXPORT [EXPORT_2D ...]
    python -m benchmarks.gpu.probe capture EXPORT
    python -m benchmarks.gpu.probe profile EXPORT
    python -m benchmarks.gpu.probe fidelity MODEL EXPORT_FP32

Each runs in its own process (the proof gives each a time cap). On a machine
without a usable GPU every subcommand still runs on the CPU provider, and what
only a GPU can answer is reported as "skipped: no GPU".
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import cpu_name

NO_GPU = "skipped: no GPU"
_PLACED = re.compile(r"(Node\(s\)|All nodes) placed on \[(\w+)\]\. Number of nodes: (\d+)")
_NODE = re.compile(r"VerifyEachNodeIsAssignedToAnEp\]\s+(\w+) \((.*)\)\s*$")


def _cuda() -> str | None:
    """Why CUDA cannot be used here, or None."""
    from jobbert_onnx.runtime.sessions import _cuda_blocker

    return _cuda_blocker()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def env() -> dict[str, Any]:
    """Machine, driver, CUDA, versions, providers, and which CUDA libraries the CUDA provider loaded."""
    import onnxruntime as ort

    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "onnxruntime_file": ort.__file__,
        "providers": ort.get_available_providers(),
        "versions": {n: _version(n) for n in ("torch", "transformers", "sentence-transformers", "tokenizers", "onnx")},
    }
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,compute_cap,clocks.max.sm"
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True
        )
        facts["gpu"] = smi.stdout.strip()
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
        found = re.search(r"CUDA Version:\s*([\d.]+)", header)
        facts["driver_cuda"] = found.group(1) if found else None
    try:
        import torch

        facts["torch_cuda"] = torch.version.cuda
        facts["torch_gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    blocker = _cuda()
    facts["cuda_blocker"] = blocker
    if blocker is None:
        from jobbert_onnx.runtime.sessions import Device, create_session

        graph = _identity_graph()
        create_session(graph, Device("cuda"))
        maps = Path("/proc/self/maps").read_text().splitlines()
        libraries = {line.split()[-1] for line in maps if re.search(r"lib(cud|cublas|curand|cufft|nvrtc)", line)}
        facts["cuda_libraries_loaded"] = sorted(libraries)
    return facts


def _identity_graph() -> Path:
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = Path(tempfile.mkdtemp()) / "probe.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


@contextlib.contextmanager
def _captured_fds() -> Iterator[list[str]]:
    """Capture what native code writes to stdout and stderr (onnxruntime logs there, not to Python)."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines())


def _providers(on_gpu: bool) -> list[Any]:
    from jobbert_onnx.runtime.sessions import Device

    return Device("cuda" if on_gpu else "cpu").providers()


def placement(exports: list[Path]) -> dict[str, Any]:
    """Per graph: nodes per execution provider, the nodes left on the CPU, Memcpy nodes; per mask form:
    the attention kernel onnxruntime picks and whether padded positions of the output hold non-finite values."""
    os.environ["ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO"] = "1"  # read when the Attention kernels are built
    import onnxruntime as ort

    from jobbert_onnx.manifest import POOLING_FILE, head_file, read_manifest

    on_gpu = _cuda() is None
    result: dict[str, Any] = {"device": "cuda" if on_gpu else "cpu", "graphs": {}, "attention": {}}
    first = read_manifest(exports[0])
    files = [first.variants["fp16"].file, POOLING_FILE, *(head_file(r) for r in first.routes)]
    for name in files:
        result["graphs"][name] = _placement_of(exports[0] / name, on_gpu)
    rng = np.random.default_rng(0)
    for folder in exports:
        manifest = read_manifest(folder)
        form = manifest.variants["fp16"].attention_mask
        options = ort.SessionOptions()
        options.log_severity_level = 3
        with _captured_fds() as lines:
            session = ort.InferenceSession(str(folder / manifest.variants["fp16"].file), options, _providers(on_gpu))
            nonfinite = 0
            for rows, width in ((1, 16), (32, 16), (256, 64)):
                lengths = rng.integers(2, width + 1, rows)
                mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int64)
                ids = np.where(mask == 1, rng.integers(5, 1000, mask.shape), 1).astype(np.int64)
                out = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
                nonfinite += int((~np.isfinite(out[mask == 0])).sum())
        # One line per Attention node and run: the node's name aside, they say which kernel ran.
        kernels = Counter(
            re.sub(r"Node=\S+\s*", "", line.strip()) for line in lines if "Attention" in line and "=" in line
        )
        result["attention"][form] = {
            "kernel_lines": [f"{count} x {line}" for line, count in kernels.items()][:8]
            or ["(no kernel information printed" + ("" if on_gpu else ": CPU provider") + ")"],
            "nonfinite_at_padded_positions": nonfinite,
        }
    return result


def _placement_of(path: Path, on_gpu: bool) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 0
    options.log_verbosity_level = 0
    with _captured_fds() as lines:
        ort.InferenceSession(str(path), options, _providers(on_gpu))
    per_provider: dict[str, int] = {}
    nodes: dict[str, list[str]] = {}
    current = ""
    for line in lines:
        placed = _PLACED.search(line)
        if placed:
            current = placed.group(2)
            per_provider[current] = int(placed.group(3))
            continue
        node = _NODE.search(line)
        if node:
            nodes.setdefault(current, []).append(node.group(1))
    listed = [op for ops in nodes.values() for op in ops]
    return {
        "nodes_per_provider": per_provider,
        "cpu_nodes": dict(Counter(nodes.get("CPUExecutionProvider", []))) if on_gpu else "all (CPU provider)",
        "memcpy_nodes": sum(op.startswith("Memcpy") for op in listed),
    }


def capture_plan(buckets: tuple[int, ...] | list[int], limit: int) -> tuple[list[tuple[int, int]], int]:
    """The batch shapes (rows, width) the capture probe tries: the first `limit` the runtime would
    capture (it captures at most `MAX_CUDA_GRAPHS`), small batches first, where graphs pay; and how
    many more shapes there are that it would run without a graph."""
    shapes = [(rows, width) for rows in (1, 2, 4, 8, 16, 32, 64, 128, 256) for width in buckets]
    return shapes[:limit], max(0, len(shapes) - limit)


def capture_shapes(graphs: Any, plain: Any, shapes: list[tuple[int, int]]) -> dict[str, Any]:
    """Run each shape through `graphs` (a chain loaded with CUDA graphs) and `plain`; a shape is
    labelled captured only where the chain lists it among its captured shapes afterwards."""
    from jobbert_onnx.runtime.tokenize import Batch

    found: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for rows, width in shapes:
        ids = rng.integers(5, 1000, (rows, width)).astype(np.int64)
        batch = Batch(input_ids=ids, attention_mask=np.ones_like(ids))
        key = f"{rows}x{width}"
        try:
            graphs.run(batch, "anchor")  # captures and checks the first replay
        except Exception as error:  # reported per shape; the next shape is still tried
            found[key] = {"captured": False, "error": str(error)[:300]}
            continue
        captured = (rows, width) in set(graphs.captured_shapes())
        found[key] = {
            "captured": captured,
            "replay_ms" if captured else "uncaptured_ms": _median_ms(lambda b=batch: graphs.run(b, "anchor")),
            "plain_ms": _median_ms(lambda b=batch: plain.run(b, "anchor")),
        }
        if not captured:
            found[key]["error"] = "ran without a graph: the chain did not capture this shape"
    return found


def capture(export: Path) -> dict[str, Any]:
    """For the shapes the runtime captures with CUDA graphs: does capture work and replay match, and how fast."""
    if _cuda() is not None:
        return {"status": NO_GPU}
    from jobbert_onnx import Encoder, Tuning
    from jobbert_onnx.runtime.chain import MAX_CUDA_GRAPHS

    plain = Encoder.load(export, device="cuda", verify=False)
    graphs = Encoder.load(export, device="cuda", verify=False, tuning=Tuning(cuda_graphs=True))
    plan, beyond = capture_plan(graphs.tuning.buckets or (), MAX_CUDA_GRAPHS)
    shapes = capture_shapes(graphs.chain, plain.chain, plan)
    return {"status": "ok", "limit": MAX_CUDA_GRAPHS, "not_probed": beyond, "shapes": shapes}


def fidelity(model: Path, export: Path) -> dict[str, Any]:
    """fp16 (padded, and packed where CUDA runs it) against fp32 PyTorch on `model`, both heads, on the
    export's validation texts, whether or not they meet the gate: `export` is the one
    `benchmarks.gpu.outliers` prepares (fp32 validated; fp16 and packed derived from it)."""
    from jobbert_onnx import samples
    from jobbert_onnx.export.reference import TorchReference
    from jobbert_onnx.export.source import read_model
    from jobbert_onnx.export.validate import Expected, validate_export

    spec = read_model(str(model))
    expected = Expected.compute(TorchReference(spec), samples.validation_sample(), tuple(spec.heads))
    device = "cpu" if _cuda() is not None else "cuda"
    figures = validate_export(export, expected, device, precisions=["fp16"])
    return {"device": device, "texts": figures["texts"], **figures["variants"]["fp16"]}


def _median_ms(call: Any, runs: int = 20) -> float:
    call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def profile(export: Path) -> dict[str, Any]:
    """Where the time goes for a large batch and for one text; kernel launches and CPU time per call
    with and without CUDA graphs; the fp16 matrix-product ceiling of this GPU."""
    from jobbert_onnx import Encoder, Tuning
    from jobbert_onnx.samples import LANGUAGES, titles

    on_gpu = _cuda() is None
    device = "cuda" if on_gpu else "cpu"
    encoder = Encoder.load(export, device=device, verify=False)
    pool = [t for language in LANGUAGES for t in titles(language)]
    result: dict[str, Any] = {"device": device, "split_ms": {}}
    for name, texts in (("one title", pool[:1]), ("4096 titles", pool[:4096])):
        result["split_ms"][name] = _split(encoder, texts, batch_size=len(texts))
    if not on_gpu:
        result["per_call"] = result["fp16_ceiling_tflops"] = NO_GPU
        return result
    graphs = Encoder.load(export, device="cuda", verify=False, tuning=Tuning(cuda_graphs=True))
    result["per_call"] = {
        f"{name}, {label}": _per_call(lambda e=enc, t=texts: e.encode(t, batch_size=len(t)))
        for label, enc in (("no CUDA graphs", encoder), ("CUDA graphs", graphs))
        for name, texts in (("one title", pool[:1]), ("256 titles", pool[:256]))
    }
    result["fp16_ceiling_tflops"] = _fp16_ceiling()
    return result


def _split(encoder: Any, texts: list[str], batch_size: int) -> dict[str, float]:
    """Milliseconds in tokenizing and padding, copying in, each graph, and copying out, summed over the
    batches the runtime itself would make of `texts` (its buckets and padding; median of 5 runs)."""
    chain = encoder.chain
    runs: list[dict[str, float]] = []
    stages = chain.routes["anchor"]
    for _ in range(6):
        times = dict.fromkeys(["tokenize and pad", "copy in", *(s.key for s in stages), "copy out"], 0.0)
        start = time.perf_counter()
        tokenized = encoder.tokenizer.tokenize(texts)
        plans = encoder._plans(tokenized, batch_size)
        times["tokenize and pad"] += time.perf_counter() - start
        for plan in plans:
            start = time.perf_counter()
            batch = encoder.tokenizer.pad(tokenized, plan.rows, plan.width, plan.height)
            times["tokenize and pad"] += time.perf_counter() - start
            start = time.perf_counter()
            buffers = chain.fresh(batch)
            times["copy in"] += time.perf_counter() - start
            for stage in stages:
                start = time.perf_counter()
                stage.session.run_with_iobinding(buffers.binding(stage), None)
                buffers.values[stage.output] = buffers.output(stage)
                times[stage.key] += time.perf_counter() - start
            start = time.perf_counter()
            buffers.output(stages[-1]).numpy()
            times["copy out"] += time.perf_counter() - start
        runs.append(times)
    return {key: float(np.median([r[key] for r in runs[1:]]) * 1000) for key in runs[0]}


# CUDA runtime and driver calls that start work on the GPU: a kernel each, or a whole captured graph.
_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")


def _per_call(call: Any, calls: int = 20) -> dict[str, Any]:
    """Per call: wall and CPU milliseconds (this process), and the launches the host made (kernels,
    or graphs with CUDA graphs) as CUPTI's API callbacks, through torch's profiler, count them.
    Kernels that run are not counted: a replayed graph runs as many as it captured."""
    call()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        call()
    found: dict[str, Any] = {
        "wall_ms": (time.perf_counter() - wall) * 1000 / calls,
        "cpu_ms": (time.process_time() - cpu) * 1000 / calls,
    }
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        found["launches"] = "not measured: torch is not installed"
        return found
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
    counts = Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith(_LAUNCHES)})
    found["launches"] = dict(counts) or "none seen (CUPTI reported no launch calls)"
    return found


def _fp16_ceiling() -> float | str:
    try:
        import torch
    except ImportError:
        return "not measured: torch is not installed"
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


def main(argv: list[str]) -> int:
    command, *paths = argv
    folders = [Path(p) for p in paths]
    answers = {
        "env": lambda: env(),
        "placement": lambda: placement(folders),
        "capture": lambda: capture(folders[0]),
        "profile": lambda: profile(folders[0]),
        "fidelity": lambda: fidelity(folders[0], folders[1]),
    }
    if command not in answers:
        raise SystemExit(f"unknown probe {command!r}; choose from: {', '.join(answers)}")
    print(json.dumps(answers[command]()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
