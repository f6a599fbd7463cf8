"""A real `jobbert-onnx serve` process on a free loopback port, for the server tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

_LISTENING = re.compile(r"(?:listening on|workers on) (http://[\d.]+:\d+)")


class ServerProcess:
    """Starts the server, waits until /ready answers 200, and stops it with SIGTERM."""

    def __init__(self, model_dir: Path, *args: str, env: dict[str, str] | None = None, ready: bool = True) -> None:
        command = [sys.executable, "-m", "jobbert_onnx", "serve", str(model_dir), "--port", "0", "--device", "cpu"]
        self.process = subprocess.Popen(
            [*command, *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.log: list[str] = []
        self._found = threading.Event()
        self.url = ""
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._found.wait(120):
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.log))
        if ready:
            self.wait_ready()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            match = _LISTENING.search(line)
            if match and not self.url:
                self.url = match.group(1)
                self._found.set()
        self._found.set()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the server exited:\n" + "".join(self.log))
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the server did not become ready:\n" + "".join(self.log))

    def wait_for_log(self, fragment: str, count: int = 1, timeout: float = 120) -> None:
        """Wait until `count` lines of the server's log contain `fragment`."""
        deadline = time.monotonic() + timeout
        while sum(fragment in line for line in self.log) < count:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"expected {count} log lines with {fragment!r}:\n" + "".join(self.log))
            time.sleep(0.05)

    def post(self, body: object, headers: dict[str, str] | None = None, timeout: float = 30) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/embeddings", json=body, headers=headers, timeout=timeout)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
