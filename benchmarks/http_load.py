"""HTTP load test: `jobbert-onnx serve` against sentence-transformers behind the same framework.

    python -m benchmarks.http_load [--duration 60] [--clients 16] [--batch-clients 4]

Uses the full-size random-weight model and exports that `python -m benchmarks`
builds in .bench/ (run that once first). For each server, one after the other
on this machine: wrk (a real HTTP load generator, on loopback) runs N clients
sending single job titles, then M clients sending batches of 64 titles, each for
`--duration` seconds. Throughput, latency percentiles and errors (non-2xx and
socket errors) are recorded, next to the in-process library figures for the
same inputs, in benchmarks/results/http/load-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import orjson

from benchmarks import peers, workloads
from benchmarks.machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent
LUA_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %d, "duration_us": %d, "non_2xx": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"timeout": %d, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000))
end
"""


def _lua(bodies: list[bytes], path: Path) -> Path:
    lines = ["local bodies = {"]
    for body in bodies:
        text = body.decode("utf-8")
        if "]==]" in text:
            raise ValueError("a request body contains the Lua string terminator")
        lines.append(f"[==[{text}]==],")
    lines.append("}")
    lines.append("local i = 0")
    lines.append('local headers = {["Content-Type"] = "application/json"}')
    lines.append("request = function()")
    lines.append("  i = i % #bodies + 1")
    lines.append('  return wrk.format("POST", "/v1/embeddings", headers, bodies[i])')
    lines.append("end")
    path.write_text("\n".join(lines) + LUA_DONE, encoding="utf-8")
    return path


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server at {url} exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server at {url} was not ready after {timeout} s")


def _batch_metrics(url: str) -> tuple[float, float]:
    """(device batches, texts in them) so far, from our server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    count = re.search(r"^jobbert_batch_texts_count (\S+)$", text, re.M)
    total = re.search(r"^jobbert_batch_texts_sum (\S+)$", text, re.M)
    return (float(count.group(1)) if count else 0.0, float(total.group(1)) if total else 0.0)


def _wrk(url: str, script: Path, clients: int, duration: int, texts_per_request: int) -> dict[str, Any]:
    command = ["wrk", "-t", "1", "-c", str(clients), "-d", f"{duration}s", "--timeout", "30s", "-s", str(script), url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(x for x in output.splitlines() if x.startswith("WRK "))
    result = json.loads(line[4:])
    seconds = result["duration_us"] / 1e6
    result["requests_per_s"] = result["requests"] / seconds
    result["texts_per_s"] = result["requests"] * texts_per_request / seconds
    result["errors"] = sum(result[k] for k in ("non_2xx", "connect", "read", "write", "timeout"))
    result["clients"] = clients
    result["texts_per_request"] = texts_per_request
    return result


def _library(export: Path, singles: list[str], batches: list[list[str]], seconds: float) -> dict[str, Any]:
    """The same inputs through Encoder.encode in process (this process has nothing else running)."""
    from jobbert_onnx import Encoder

    encoder = Encoder.load(export, device="cpu", precision="int8")
    for text in singles[:20]:
        encoder.encode([text])
    latencies = []
    for text in singles[:300]:
        started = time.perf_counter()
        encoder.encode([text])
        latencies.append(time.perf_counter() - started)
    texts = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for batch in batches:
            encoder.encode(batch, batch_size=64)
            texts += len(batch)
            if time.perf_counter() - started >= seconds:
                break
    return {
        "single_p50_ms": float(np.percentile(latencies, 50) * 1000),
        "single_p99_ms": float(np.percentile(latencies, 99) * 1000),
        "single_texts_per_s": 1 / float(np.mean(latencies)),
        "batch64_texts_per_s": texts / (time.perf_counter() - started),
    }


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / ".bench")
    parser.add_argument("--duration", type=int, default=60, help="seconds per scenario")
    parser.add_argument("--clients", type=int, default=16, help="connections sending single titles")
    parser.add_argument("--batch-clients", type=int, default=4, help="connections sending batches of 64")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "http")
    parser.add_argument("--skip-peer", action="store_true")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    export = args.work / "export"
    if not (export / "manifest.json").is_file():
        raise SystemExit(f"{export} has no export: run `python -m benchmarks` once first")
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.work / "http-load"
    scratch.mkdir(parents=True, exist_ok=True)

    singles = workloads.titles(2000, seed=11)
    batches = [singles[i : i + 64] for i in range(0, 64 * 30, 64)]
    single_bodies = [orjson.dumps({"input": t, "input_type": "title"}) for t in singles]
    batch_bodies = [orjson.dumps({"input": b, "input_type": "title"}) for b in batches]
    scripts = {
        "single titles": (_lua(single_bodies, scratch / "single.lua"), 1, args.clients),
        "batches of 64 titles": (_lua(batch_bodies, scratch / "batch64.lua"), 64, args.batch_clients),
    }

    servers: dict[str, list[str]] = {
        "jobbert-onnx serve (int8)": [
            sys.executable, "-m", "jobbert_onnx", "serve", str(export), "--device", "cpu", "--precision", "int8",
        ],
    }  # fmt: skip
    if not args.skip_peer:
        python = peers.ensure_env(args.work / "peer-venv")
        peers.ensure_server_packages(python)
        file_name = f"onnx/{peers.int8_file_name(peers.quantization_config())}"
        servers["sentence-transformers ONNX int8 + Starlette"] = [
            str(python), "-m", "benchmarks.peer_server", str(args.work / "st-onnx"), file_name,
        ]  # fmt: skip

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows: list[dict[str, Any]] = []
    port = 18080
    for name, command in servers.items():
        port += 1
        full = [*command, "--port", str(port)] if "jobbert_onnx" in command else [*command, str(port)]
        process = subprocess.Popen(full, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, process)
            ours = "jobbert-onnx" in name
            for scenario, (script, per_request, clients) in scripts.items():
                before = _batch_metrics(url) if ours else None
                print(f"{name}: {scenario}, {clients} clients, {args.duration} s ...", file=sys.stderr, flush=True)
                result = _wrk(url, script, clients, args.duration, per_request)
                if before is not None:
                    after = _batch_metrics(url)
                    result["mean_device_batch"] = (after[1] - before[1]) / max(after[0] - before[0], 1)
                rows.append({"server": name, "scenario": scenario, **result})
        finally:
            rows_exit = _stop(process)
            print(f"{name}: exited with {rows_exit}", file=sys.stderr)

    print("in-process library, same inputs ...", file=sys.stderr, flush=True)
    library = _library(export, singles, batches, seconds=20)
    report = {
        "command": " ".join(["python -m benchmarks.http_load", *(argv if argv is not None else sys.argv[1:])]),
        "environment": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split(" Copyright")[0].strip(),
            "weights": "RANDOM (full-size JobBERT-v3 architecture)",
        },
        "rows": rows,
        "library": library,
    }
    (args.out / "load-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "load-cpu.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


def _markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"Command: `{report['command']}`  ",
        f"{env['cpu']}, {env['cores']} cores, Python {env['python']}, onnxruntime {env['onnxruntime']}, "
        f"{env['wrk']}; {env['weights']}. wrk runs on the same 2 cores as the server.",
        "",
        "| server | scenario | clients | requests/s | texts/s | p50 ms | p90 ms | p99 ms | errors "
        "| mean device batch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        batch = f"{row['mean_device_batch']:.1f}" if "mean_device_batch" in row else "-"
        lines.append(
            f"| {row['server']} | {row['scenario']} | {row['clients']} | {row['requests_per_s']:.1f} | "
            f"{row['texts_per_s']:.1f} | {row['p50_ms']:.1f} | {row['p90_ms']:.1f} | {row['p99_ms']:.1f} | "
            f"{row['errors']} | {batch} |"
        )
    lib = report["library"]
    lines += [
        "",
        "In process (Encoder.encode, int8, same inputs, one caller): single title p50 "
        f"{lib['single_p50_ms']:.2f} ms, p99 {lib['single_p99_ms']:.2f} ms ({lib['single_texts_per_s']:.1f} texts/s); "
        f"batches of 64 titles {lib['batch64_texts_per_s']:.1f} texts/s.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
