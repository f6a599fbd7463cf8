"""Peak memory and time of an export: `jobbert-onnx export` in a child process, sampled as it runs.

Usage: python -m benchmarks.export_memory MODEL [--precision fp16,int8] [--out DIR]

The export runs as `python -m jobbert_onnx.cli export MODEL TMP`; its resident memory
(VmRSS, the process and any children) is sampled every 50 ms, and each sample is
charged to the step the export's log was in. The peak is the kernel's own count,
``ru_maxrss`` of the waited-for children, so a spike between samples is not missed.
Prints one JSON object and, with ``--out``, writes it and a Markdown table there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import cpu_name

SAMPLE_SECONDS = 0.05


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and its descendants (0 once it is gone)."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
        pending += [int(child) for child in children]
    return total


def measure(model: str, precision: str | None, output: Path | None = None) -> dict[str, Any]:
    """Run one export (into `output`, or a temporary folder) and return its peak memory, wall
    time, the peak of each logged step and the sha256 of each file written."""
    with tempfile.TemporaryDirectory(prefix="export-memory-") as scratch:
        folder = output or Path(scratch) / "export"
        command = [sys.executable, "-m", "jobbert_onnx.cli", "export", model, str(folder)]
        if precision:
            command += ["--precision", precision]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.perf_counter()
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
        steps: list[dict[str, Any]] = [{"step": "start", "at_s": 0.0, "peak_bytes": 0}]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss = tree_rss(child.pid)
                step = steps[-1]
                step["peak_bytes"] = max(step["peak_bytes"], rss)
                time.sleep(SAMPLE_SECONDS)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        assert child.stdout is not None
        output = []
        for line in child.stdout:
            output.append(line)
            steps.append({"step": line.strip()[:100], "at_s": round(time.perf_counter() - started, 1), "peak_bytes": 0})
        returncode = child.wait()
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
        if returncode != 0:
            raise SystemExit(f"the export failed ({returncode}):\n{''.join(output[-20:])}")
        manifest = json.loads((folder / "manifest.json").read_text())
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest of any child so far; a larger earlier child would hide this one.
    if peak_kib == before and before > 0:
        raise SystemExit("an earlier child of this process peaked higher; run one export per process")
    return {
        "peak_bytes": peak_kib * 1024,
        "seconds": round(elapsed, 1),
        # What was written, to compare exports of two versions of the exporter.
        "files_sha256": {name: facts["sha256"] for name, facts in manifest["files"].items()},
        "steps": [
            {"step": step["step"], "at_s": step["at_s"], "peak_gib": round(step["peak_bytes"] / 2**30, 2)}
            for step in steps
        ],
    }


def weights_bytes(model: Path) -> int:
    return sum(path.stat().st_size for path in model.rglob("*.safetensors"))


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Export memory: {result['model']}",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {result['machine']}",
        f"- precisions: {result['precision'] or 'default'}",
        f"- peak resident (ru_maxrss): **{result['peak_gib']} GiB**, {result['peak_over_weights']}x the "
        f"{result['weights_gib']} GiB of weights; {result['seconds']} s",
        "",
        "| at s | step (the export's log line that started it) | peak GiB in step |",
        "|---:|---|---:|",
    ]
    lines += [f"| {step['at_s']} | {step['step']} | {step['peak_gib']} |" for step in result["steps"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export_memory", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="hub id or sentence-transformers folder")
    parser.add_argument("--precision", help="as `jobbert-onnx export --precision` (default: the export's defaults)")
    parser.add_argument("--out", type=Path, help="folder for export-memory.json and .md")
    args = parser.parse_args(argv)
    result = measure(args.model, args.precision)
    weights = weights_bytes(Path(args.model)) if Path(args.model).is_dir() else 0
    result = {
        "model": args.model,
        "precision": args.precision,
        "command": "python -m benchmarks.export_memory " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "peak_gib": round(result["peak_bytes"] / 2**30, 2),
        "weights_gib": round(weights / 2**30, 2),
        "peak_over_weights": round(result["peak_bytes"] / weights, 1) if weights else None,
        **result,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "export-memory.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "export-memory.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
