"""The server under hostile traffic: schemathesis against its OpenAPI description, dropped and
half-sent connections, then a check that it still answers correctly and did not grow."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from server_process import ServerProcess

from jobbert_onnx import Encoder


@pytest.fixture(scope="module")
def server(tiny_exports: dict) -> Iterator[ServerProcess]:
    with ServerProcess(tiny_exports[("router", "fp32")], "--precision", "fp32", "--max-body-bytes", "65536") as process:
        yield process


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _still_correct(server: ServerProcess, model_dir: Path) -> None:
    reference = Encoder.load(model_dir, device="cpu", precision="fp32")
    response = server.post({"input": ["Software Engineer", "python, sql"], "input_type": "positive"})
    assert response.status_code == 200
    vectors = np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)
    expected = reference.encode(["Software Engineer", "python, sql"], task="positive")
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(server: ServerProcess, tiny_exports: dict, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "schemathesis.cli"] if shutil.which("schemathesis") is None else ["schemathesis"]
    result = subprocess.run(
        [
            *command, "--config-file", str(Path(__file__).with_name("schemathesis.toml")),
            "run", f"{server.url}/openapi.json",
            "--checks", "all", "--mode", "all", "--max-examples", "300", "--seed", "7",
            "--request-timeout", "20", "--report-dir", str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    tested = re.search(r"Tested: (\d+)", result.stdout)
    cases = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert tested and int(tested.group(1)) == 5, result.stdout[-3000:]  # every operation of the spec
    assert cases and int(cases.group(1)) >= 300 and cases.group(1) == cases.group(2), result.stdout[-3000:]
    _still_correct(server, tiny_exports[("router", "fp32")])


def test_dropped_and_half_sent_connections_do_not_hurt(server: ServerProcess, tiny_exports: dict) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    pid = server.process.pid

    def abuse(rounds: int) -> None:
        for index in range(rounds):
            conn = socket.create_connection((host, int(port)), timeout=5)
            if index % 3 == 0:  # headers promise a body that never comes, then a reset
                conn.sendall(b'POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{"input": [')
            elif index % 3 == 1:  # a request line cut in half
                conn.sendall(b"POST /v1/embe")
            else:  # a full request whose client disappears before the answer
                conn.sendall(b'POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 18\r\n\r\n{"input": "Koch"}')
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
            conn.close()

    abuse(300)  # warm-up: allocator pools and connection objects reach their steady size
    assert server.post({"input": "warm"}).status_code == 200
    before = _rss_mib(pid)
    abuse(1500)
    assert server.post({"input": "still here"}).status_code == 200
    after = _rss_mib(pid)
    assert after <= before * 1.05 + 2, f"resident memory went from {before:.1f} to {after:.1f} MiB"
    _still_correct(server, tiny_exports[("router", "fp32")])
    assert httpx.get(f"{server.url}/health").status_code == 200
