"""Run the server: one process, or several worker processes sharing one port.

Several workers (``--workers N`` per device, ``--device cuda:0,cuda:1`` for one
group per GPU) each load the model and run their own queue; they bind the same
port with SO_REUSEPORT and the kernel spreads connections over them. A small
supervisor forwards SIGTERM/SIGINT to them, restarts one that dies after it has
loaded the model (one that fails to start stops the server: it would fail
again), and sums their metrics through prometheus_client's multiprocess directory.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from jobbert_onnx.errors import SetupError
from jobbert_onnx.manifest import read_manifest
from jobbert_onnx.serve.config import ServeConfig

log = logging.getLogger("jobbert_onnx.serve")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def announce(line: str) -> None:
    """A line for the operator (and the tests) on stderr."""
    print(f"jobbert-onnx serve: {line}", file=sys.stderr, flush=True)


def bind(host: str, port: int, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A TCP socket bound to (host, port), listening unless told not to; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise SetupError(f"cannot listen on {host}:{port} ({error.strerror}); choose another --port") from None
    if listen:
        sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def serve(config: ServeConfig) -> int:
    """Serve until SIGTERM/SIGINT; return the exit status (0 after a graceful stop)."""
    config.check().check_model(read_manifest(config.model_dir).max_seq_length)
    plan = [device for device in config.devices for _ in range(config.workers)]
    if len(plan) == 1:
        sock = bind(config.host, config.port)
        return run_worker(config.for_worker(plan[0], config.threads), lambda: sock, announce, warm_first=False)
    threads = config.threads or max(1, (os.cpu_count() or 1) // len(plan))
    return _supervise(config, [config.for_worker(device, threads) for device in plan])


def run_worker(
    config: ServeConfig, listen: Callable[[], socket.socket], announce: Callable[[str], None], warm_first: bool
) -> int:
    """Load the model and serve on the socket `listen` gives until told to stop.

    A single server listens at once and warms up in the background (``/ready`` says
    when it is done). A worker of several warms up first and only then listens, so the
    kernel never hands a connection to a worker that is not ready, also after a restart.
    """
    import uvicorn

    from jobbert_onnx.runtime import Encoder
    from jobbert_onnx.serve.app import build_app, warm_up
    from jobbert_onnx.serve.queue import encoding_thread

    encoder = Encoder.load(
        config.model_dir,
        device=config.devices[0],
        precision=config.precision,
        threads=config.threads,
        verify=config.verify,
    )
    encode_thread = encoding_thread()
    if warm_first:  # on the thread that will encode: buffers and CUDA graphs are per thread
        encode_thread.submit(warm_up, encoder, config.batch_limits(encoder.device.kind)[0]).result()
    app = build_app(encoder, config, warmed=warm_first, encode_thread=encode_thread)
    sock = listen()
    host, port = sock.getsockname()[:2]
    announce(
        f"listening on http://{host}:{port} (pid {os.getpid()}, {encoder.device}, {encoder.precision}, "
        f"model {config.served_model_name!r}, API key {'required' if config.api_key else 'off'})"
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=30,
            server_header=False,
        )
    )
    # uvicorn stops gracefully on SIGTERM, then raises the signal again under the handler
    # that was in place before it: make that one a no-op, so a graceful stop exits 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _worker_main(config: ServeConfig, host: str, port: int, started: Any) -> None:
    setup_logging()

    def announce_started(line: str) -> None:
        announce(line)
        started.set()  # the model loaded: from now on a death is a crash, not a bad start

    try:
        code = run_worker(config, lambda: bind(host, port, reuse_port=True), announce_started, warm_first=True)
    except Exception as error:
        announce(f"worker error: {error}")
        code = 1
    sys.exit(code)


def _supervise(config: ServeConfig, workers: list[ServeConfig]) -> int:
    from prometheus_client import multiprocess

    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    owned_dir = None
    if not metrics_dir:
        owned_dir = tempfile.TemporaryDirectory(prefix="jobbert-onnx-metrics-")
        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = owned_dir.name
    # Hold the port (bound, not listening) so port 0 resolves once for every worker.
    holder = bind(config.host, config.port, reuse_port=True, listen=False)
    port = holder.getsockname()[1]
    context = multiprocessing.get_context("spawn")

    def start(worker: ServeConfig) -> Any:
        started = context.Event()
        process = context.Process(target=_worker_main, args=(worker, config.host, port, started), daemon=False)
        process.start()
        return process, started

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    running = [start(worker) for worker in workers]
    announce(f"supervising {len(workers)} workers on http://{config.host}:{port} (metrics in {metrics_dir})")
    failed = False
    try:
        while not stopping and not failed:
            time.sleep(0.2)
            for slot, (process, started) in enumerate(running):
                if process.is_alive():
                    continue
                multiprocess.mark_process_dead(process.pid)
                if not started.is_set():  # it would fail again: stop rather than loop
                    announce(f"worker {slot} exited with {process.exitcode} at start-up; stopping")
                    failed = True
                    break
                announce(f"worker {slot} exited with {process.exitcode}; restarting it")
                running[slot] = start(workers[slot])
    finally:
        for process, _ in running:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        codes = []
        for process, _ in running:
            process.join()
            codes.append(process.exitcode)
        holder.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if owned_dir is not None:
            owned_dir.cleanup()
    return 1 if failed or any(code != 0 for code in codes) else 0
