"""Run one contender on the workloads, in its own process: `python -m benchmarks.worker CONFIG.json`.

One process per contender keeps peak memory per contender honest and lets the
peers run in their own environment. This module imports only the standard
library and numpy at the top, so it runs in both environments.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

# Set by the benchmark for workers in its own Python: the onnxruntime (version, file) they must import.
SAME_ONNXRUNTIME_ENV = "JOBBERT_ONNX_BENCH_ONNXRUNTIME"

EncodeFn = Callable[[list[str], str, int], np.ndarray]
# A timed run longer than this is not repeated: the median of one.
SLOW_RUN_S = 20.0


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _jobbert_onnx(config: dict[str, Any]) -> tuple[EncodeFn, dict[str, Any]]:
    from jobbert_onnx import Encoder, Tuning

    options = dict(config.get("options", {}))
    precision = options.pop("precision", None)
    export = options.pop("export", None) or config["export"]
    # Peers encode every text, repeats included: so does this contender, unless a run asks otherwise.
    options.setdefault("dedup", False)
    encoder = Encoder.load(export, device=config["device"], precision=precision, tuning=Tuning.from_options(options))

    def encode(texts: list[str], task: str, batch_size: int) -> np.ndarray:
        return encoder.encode(texts, task=task, batch_size=batch_size)

    def after() -> dict[str, Any]:
        """What is known only once batches ran: whether the host buffers were page-locked."""
        host = encoder.chain.host
        if host is None:
            return {}
        return {"host_buffers": "page-locked" if host.failure is None else f"pageable ({host.failure})"}

    return encode, {
        "precision": encoder.precision,
        "provider": encoder.chain.encoder.get_providers()[0],
        "io_binding": True,
        "graphs": "merged" if encoder.chain.merged else "chained",
        "after": after,
    }


def _merged(config: dict[str, Any]) -> tuple[EncodeFn, dict[str, Any]]:
    from benchmarks.merged import MergedEncoder

    merged = MergedEncoder(Path(config["export"]), config["options"]["precision"], config["device"])
    return merged.encode, {
        "precision": config["options"]["precision"],
        "provider": merged.provider,
        "io_binding": False,
    }


def _st_torch(config: dict[str, Any]) -> tuple[EncodeFn, dict[str, Any]]:
    """sentence-transformers on PyTorch, TF32 off (the fp32 reference must be fp32), fp16 asked for with
    transformers 5's ``dtype=``; what it ran with is read back from the loaded model."""
    import torch
    from sentence_transformers import SentenceTransformer

    tf32 = _tf32_off(torch)
    half = config["options"].get("precision") == "fp16"
    model_kwargs = {"dtype": torch.float16} if half else {}
    model = SentenceTransformer(config["model"], device=config["device"], model_kwargs=model_kwargs)

    def encode(texts: list[str], task: str, batch_size: int) -> np.ndarray:
        return np.asarray(model.encode(texts, task=task, batch_size=batch_size), dtype=np.float32)

    return encode, {
        "precision": "fp16" if half else "fp32",
        "provider": f"torch {config['device']}",
        "dtype": str(getattr(model, "dtype", None)),
        "parameter_dtypes": parameter_dtypes(model),
        "tf32": tf32,
    }


def parameter_dtypes(model: Any) -> dict[str, int]:
    """How many parameters of `model` are held in each dtype (the encoder's and the heads' may differ)."""
    counts: dict[str, int] = {}
    for parameter in model.parameters():
        name = str(parameter.dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + int(parameter.numel())
    return counts


def _tf32_off(torch: Any) -> dict[str, Any]:
    """Turn TF32 off for matrix products and cuDNN; returns the settings found and the settings set."""

    def read() -> dict[str, Any]:
        return {
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        }

    found = read()
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    return {"found": found, "ran_with": read()}


def _st_onnx(config: dict[str, Any]) -> tuple[EncodeFn, dict[str, Any]]:
    from sentence_transformers import SentenceTransformer

    file_name = config["options"]["file_name"]
    model = SentenceTransformer(
        config["st_onnx"], backend="onnx", device=config["device"], model_kwargs={"file_name": file_name}
    )

    def encode(texts: list[str], task: str, batch_size: int) -> np.ndarray:
        return np.asarray(model.encode(texts, task=task, batch_size=batch_size), dtype=np.float32)

    return encode, {"precision": config["options"]["precision"], "provider": "onnxruntime CPU + torch heads"}


def _optimum(config: dict[str, Any]) -> tuple[EncodeFn, dict[str, Any]]:
    """Optimum's ORTModelForFeatureExtraction for the encoder; pooling and heads in numpy, as a user would."""
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    folder = Path(config["st_onnx"])
    model = ORTModelForFeatureExtraction.from_pretrained(folder, subfolder="onnx", file_name="model.onnx")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    router = json.loads((folder / "modules.json").read_text())[2]["path"]
    heads = {}
    for route_dir in (folder / router).iterdir():
        weights = route_dir / "model.safetensors"
        if weights.is_file():
            state = load_file(str(weights))
            heads[route_dir.name.split("_")[0]] = (state["linear.weight"], state["linear.bias"])

    def encode(texts: list[str], task: str, batch_size: int) -> np.ndarray:
        weight, bias = heads[task]
        out = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=64, return_tensors="np"
            )
            hidden = model(**batch).last_hidden_state
            hidden = hidden.numpy() if hasattr(hidden, "numpy") else np.asarray(hidden)
            mask = batch["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
            out.append(np.tanh(pooled @ weight.T + bias))
        return np.concatenate(out).astype(np.float32)

    return encode, {"precision": "fp32", "provider": "onnxruntime CPU (optimum) + numpy heads"}


def _st_openvino(config: dict[str, Any]) -> tuple[EncodeFn, dict[str, Any]]:
    """sentence-transformers with backend="openvino": the encoder in OpenVINO, pooling and heads in torch."""
    import openvino as ov
    from sentence_transformers import SentenceTransformer

    folder = Path(config["st_openvino"])
    file_name = config["options"]["file_name"]
    model = SentenceTransformer(str(folder), backend="openvino", device="cpu", model_kwargs={"file_name": file_name})

    def encode(texts: list[str], task: str, batch_size: int) -> np.ndarray:
        return np.asarray(model.encode(texts, task=task, batch_size=batch_size), dtype=np.float32)

    hint = str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
    return encode, {
        "precision": config["options"]["precision"],
        "provider": f"OpenVINO {ov.get_version().split('-')[0]} CPU (inference precision {hint}) + torch heads",
    }


FACTORIES = {
    "jobbert-onnx": _jobbert_onnx,
    "merged": _merged,
    "st-torch": _st_torch,
    "st-onnx": _st_onnx,
    "optimum": _optimum,
    "st-openvino": _st_openvino,
}


def _latency(encode: EncodeFn, texts: list[str], task: str, calls: int) -> dict[str, float]:
    """Single-text calls: every text that will be timed runs once first, so every shape is warm."""
    timed = [texts[i % len(texts)] for i in range(calls)]
    for text in dict.fromkeys(timed):
        encode([text], task, 1)
    times = []
    for text in timed:
        start = time.perf_counter()
        encode([text], task, 1)
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1000
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 99)} | {"calls": calls}


def point_texts(texts: list[str], batch_size: int, batches: int | None, keep: int | None) -> list[str]:
    """The texts one throughput point encodes: all of them, or with `batches` the first `batches`
    batches' worth (small batches need fewer texts to be timed well), never fewer than `keep`
    (the texts whose vectors are compared)."""
    if batches is None:
        return texts
    return texts[: max(batch_size * batches, keep or 0)]


def _throughput(
    encode: EncodeFn, texts: list[str], task: str, batch_size: int, repeats: int
) -> tuple[dict[str, Any], np.ndarray]:
    """Texts per second, and the vectors: one untimed run of the same call, then the median of
    `repeats` timed runs. A run slower than `SLOW_RUN_S` is not repeated (the point says how many ran).
    """
    encode(texts, task, batch_size)
    seconds: list[float] = []
    while len(seconds) < repeats and (not seconds or seconds[0] <= SLOW_RUN_S):
        start = time.perf_counter()
        vectors = encode(texts, task, batch_size)
        seconds.append(time.perf_counter() - start)
    median = float(np.median(seconds))
    return {"seconds": median, "texts_per_s": len(texts) / median, "runs": len(seconds), "texts": len(texts)}, vectors


def run(config: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    memory = _GpuMemory(config["device"])
    encode, facts = FACTORIES[config["kind"]](config)
    after = facts.pop("after", None)  # facts a contender knows only after its runs
    result: dict[str, Any] = {
        "contender": config["name"],
        "kind": config["kind"],
        "device": config["device"],
        **facts,
        "load_s": time.perf_counter() - started,
        "workloads": {},
    }
    out = Path(config["out"])
    batch_sizes = config.get("contender_batch_sizes") or config["batch_sizes"]
    repeats = int(config.get("contender_repeats") or config.get("repeats", 1))
    compared = config.get("quality_texts")
    for workload, spec in config["workloads"].items():
        texts, task = spec["texts"], spec["task"]
        if config.get("quality_only"):  # the reference: vectors only, no timing
            row: dict[str, Any] = {"latency": None}
            vectors = encode(texts[:compared], task, batch_sizes[0])
            np.save(out / f"{config['slug']}.{workload}.npy", vectors.astype(np.float32))
            row["throughput"] = {str(b): None for b in config["batch_sizes"]}
            result["workloads"][workload] = row
            continue
        row = {"latency": _latency(encode, texts, task, config["latency_calls"]), "throughput": {}}
        for batch_size in config["batch_sizes"]:
            if batch_size not in batch_sizes or batch_size > len(texts):
                row["throughput"][str(batch_size)] = None  # not run for this contender, or fewer texts than a batch
                continue
            timed = point_texts(texts, batch_size, config.get("batches_per_point"), compared)
            point, vectors = _throughput(encode, timed, task, batch_size, repeats)
            row["throughput"][str(batch_size)] = point
            if batch_size == batch_sizes[0]:
                np.save(out / f"{config['slug']}.{workload}.npy", vectors[:compared].astype(np.float32))
        result["workloads"][workload] = row
    if after is not None:
        result.update(after())
    result["peak_rss_mib"] = _peak_rss_mib()
    result["peak_gpu_mib"] = memory.stop()
    result["versions"] = {
        "python": platform.python_version(),
        **{name: _version(name) for name in ("onnxruntime", "onnxruntime-gpu", "torch", "transformers")},
        **{
            name: _version(name)
            for name in ("sentence-transformers", "optimum", "optimum-onnx", "optimum-intel", "openvino", "nncf")
        },
    }
    return result


def _peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, it does not carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _GpuMemory:
    """Peak GPU memory of this process, sampled through NVML every 20 ms (any framework's allocations).

    NVML reports what the driver holds for the process (context, arenas and caches
    included). Where it cannot list processes (some virtual machines), the device's
    used memory above what was used at the start is taken instead.
    """

    def __init__(self, device: str) -> None:
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device == "cpu":
            return
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
            index = int(device.split(":")[1]) if ":" in device else 0
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError:
            return
        baseline = pynvml.nvmlDeviceGetMemoryInfo(handle).used
        pid = os.getpid()

        def sample() -> float:
            try:
                for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if process.pid == pid and process.usedGpuMemory:
                        return float(process.usedGpuMemory)
            except pynvml.NVMLError:
                pass
            return float(max(0, pynvml.nvmlDeviceGetMemoryInfo(handle).used - baseline))

        def watch() -> None:
            while not self._stop.wait(0.02):
                self.peak = max(self.peak or 0.0, sample())

        self.peak = 0.0
        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()

    def stop(self) -> float | None:
        """The peak in MiB, or None where it could not be measured."""
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        return None if self.peak is None else self.peak / 2**20


def check_onnxruntime() -> None:
    """Fail where this process imported another onnxruntime than the one that started it
    (a benchmark worker, or a child of the GPU proof: `benchmarks.gpu.child`)."""
    expected = os.environ.get(SAME_ONNXRUNTIME_ENV)
    if not expected:
        return
    import onnxruntime as ort

    want, got = json.loads(expected), {"version": ort.__version__, "file": ort.__file__}
    if got != want:
        raise SystemExit(
            f"this process imported onnxruntime {got['version']} from {got['file']}, but the process that "
            f"started it runs {want['version']} from {want['file']}: start it with the PYTHONPATH that found that one"
        )


def die_with_parent() -> None:
    """Have the kernel kill this process when the process that started it dies (Linux), so that a
    run killed from outside leaves nothing running: the GPU proof's children start new sessions,
    which a kill of the proof's own process group does not reach."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing to ask
        return


def main(argv: list[str]) -> int:
    die_with_parent()
    check_onnxruntime()
    config = json.loads(Path(argv[0]).read_text())
    result = run(config)
    (Path(config["out"]) / f"{config['slug']}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
