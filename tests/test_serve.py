"""The server, through real `jobbert-onnx serve` processes on free loopback ports."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import OpenAI
from server_process import ServerProcess

from jobbert_onnx import Encoder

TITLES = ["Software Engineer", "Pflegefachkraft", "Ingeniero de datos", "软件工程师", "Koch"]
SKILLS = ["python, sql, docker, kubernetes, terraform", "Patientenpflege, Wundversorgung, Dokumentation"]


@pytest.fixture(scope="module")
def model_dir(tiny_exports: dict[tuple[str, str], Path]) -> Path:
    return tiny_exports[("router", "fp32")]


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Encoder:
    return Encoder.load(model_dir, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess(model_dir, "--precision", "fp32") as process:
        yield process


@pytest.fixture(scope="module")
def limited(model_dir: Path) -> Iterator[ServerProcess]:
    """Small limits; a batch waits 3 s for company, so the queue can be filled on purpose."""
    args = ["--precision", "fp32", "--max-body-bytes", "2000", "--body-timeout-s", "1"]
    args += ["--max-queue-texts", "4", "--max-inputs", "4", "--max-wait-ms", "3000"]
    with ServerProcess(model_dir, *args) as process:
        yield process


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)


def test_openai_client_gets_both_heads(server: ServerProcess, reference: Encoder) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    for input_type, texts, task in [("title", TITLES, "anchor"), ("skills", SKILLS, "positive")]:
        response = client.embeddings.create(model="jobbert-v3", input=texts, extra_body={"input_type": input_type})
        assert [item.index for item in response.data] == list(range(len(texts)))
        vectors = np.array([item.embedding for item in response.data], dtype=np.float32)
        _close(vectors, reference.encode(texts, task=task))
        expected_tokens = int(reference.tokenizer.tokenize(texts).lengths.sum())
        assert response.usage.prompt_tokens == response.usage.total_tokens == expected_tokens
    anchors = client.embeddings.create(model="jobbert-v3", input=SKILLS[0]).data[0].embedding
    positives = client.embeddings.create(model="jobbert-v3", input=SKILLS[0], extra_body={"input_type": "document"})
    assert not np.allclose(anchors, positives.data[0].embedding), "the default head must be anchor, not positive"
    _close(np.array(anchors, dtype=np.float32), reference.encode(SKILLS[0], task="anchor"))


def test_openai_client_float_format_and_models(server: ServerProcess, reference: Encoder) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    response = client.embeddings.create(model="jobbert-v3", input=TITLES[:2], encoding_format="float")
    _close(np.array([d.embedding for d in response.data], dtype=np.float32), reference.encode(TITLES[:2]))
    assert [model.id for model in client.models.list()] == ["jobbert-v3"]


def test_base64_decodes_to_the_float_vectors(server: ServerProcess) -> None:
    as_float = server.post({"input": TITLES, "encoding_format": "float"}).json()
    as_base64 = server.post({"input": TITLES, "encoding_format": "base64"}).json()
    for plain, packed in zip(as_float["data"], as_base64["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(packed["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(plain["embedding"], dtype=np.float32))


def test_long_text_is_truncated_not_refused(server: ServerProcess, reference: Encoder) -> None:
    text = "Softwareentwicklung und Projektleitung " * 5000
    response = server.post({"input": text, "input_type": "positive"})
    assert response.status_code == 200
    _close(np.array(response.json()["data"][0]["embedding"], dtype=np.float32), reference.encode(text, task="positive"))
    assert response.json()["usage"]["prompt_tokens"] == reference.max_seq_length


def test_concurrent_requests_match_sequential_results(server: ServerProcess, reference: Encoder) -> None:
    rng = np.random.default_rng(3)
    words = " ".join(TITLES + SKILLS).split()
    jobs = []
    for _ in range(48):
        task = ["anchor", "positive"][int(rng.integers(2))]
        texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for _ in range(int(rng.integers(1, 9)))]
        jobs.append((task, texts))

    def send(job: tuple[str, list[str]]) -> np.ndarray:
        response = server.post({"input": job[1], "input_type": job[0]})
        assert response.status_code == 200, response.text
        return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(send, jobs))
    for (task, texts), vectors in zip(jobs, results, strict=True):
        _close(vectors, reference.encode(texts, task=task))


BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'{"model": "jobbert-v3"}', 400, "'input' is required"),
    (b'{"input": []}', 400, "empty list"),
    (b'{"input": 5}', 400, "a string or a list of strings"),
    (b'{"input": ["ok", null]}', 400, "'input[1]' is null"),
    (b'{"input": [[1, 2, 3]]}', 400, "token-id inputs are not supported"),
    (b'{"input": "x", "input_type": "query_v2"}', 400, "unknown input_type 'query_v2'; use one of: anchor"),
    (b'{"input": "x", "input_type": 1}', 400, "'input_type' must be a string"),
    (b'{"input": "x", "encoding_format": "int8"}', 400, "unknown encoding_format 'int8'"),
    (b'{"input": "x", "input_typ": "positive"}', 400, "unknown field(s) 'input_typ'"),
    (b'{"input": "x", "dimensions": 256}', 400, "'dimensions' must be 1024"),
    (b'{"input": "x", "model": "text-embedding-3-small"}', 404, "is not served here"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_an_openai_error_that_says_what_is_wrong(
    server: ServerProcess, body: bytes, status: int, message: str
) -> None:
    response = httpx.post(f"{server.url}/v1/embeddings", content=body, timeout=10)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"]
    assert {"message", "type", "param", "code"} <= set(error)


def test_unknown_route_and_method(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/v2/embeddings").status_code == 404
    response = httpx.get(f"{server.url}/v1/embeddings")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert "use POST" in response.json()["error"]["message"]


def test_health_ready_metrics_and_openapi(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/ready").status_code == 200
    server.post({"input": "x", "input_type": "nope"})
    server.post({"input": ["Data Analyst", "Chef"], "input_type": "query"})
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in [
        'jobbert_requests_total{code="400",path="/v1/embeddings"}',
        'jobbert_requests_total{code="200",path="/v1/embeddings"}',
        "jobbert_request_duration_seconds_bucket",
        "jobbert_batch_texts_bucket",
        "jobbert_queue_texts",
        "jobbert_tokens_total",
        'jobbert_texts_total{input_type="anchor"}',
        "jobbert_ready 1.0",
    ]:
        assert name in metrics, name
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/embeddings" in spec["paths"]


def test_body_over_the_limit_gets_413(limited: ServerProcess) -> None:
    response = limited.post({"input": ["x" * 3000]})
    assert response.status_code == 413
    assert "limit is 2000" in response.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to refuse early
        yield b'{"input": ["'
        for _ in range(10):
            yield b"y" * 500
        yield b'"]}'

    response = httpx.post(f"{limited.url}/v1/embeddings", content=chunks(), timeout=10)
    assert response.status_code == 413


def test_too_many_inputs_gets_400(limited: ServerProcess) -> None:
    response = limited.post({"input": ["a"] * 5})
    assert response.status_code == 400
    assert "at most 4 per request" in response.json()["error"]["message"]


def test_slow_body_gets_408_and_the_server_goes_on(limited: ServerProcess) -> None:
    host, port = limited.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b'POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"input"')
        reply = conn.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 408"), reply
    assert limited.post({"input": "still serving"}, timeout=10).status_code == 200


def test_full_queue_gets_503_with_retry_after(limited: ServerProcess) -> None:
    first: dict[str, httpx.Response] = {}
    sender = threading.Thread(target=lambda: first.update(r=limited.post({"input": ["a", "b", "c", "d"]})))
    sender.start()
    deadline = time.monotonic() + 2
    while "jobbert_queue_texts 4.0" not in httpx.get(f"{limited.url}/metrics").text:
        assert time.monotonic() < deadline, "the first request never queued"
        time.sleep(0.02)
    refused = limited.post({"input": "one more"})
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "server_overloaded"
    sender.join()
    assert first["r"].status_code == 200
    assert len(first["r"].json()["data"]) == 4


def test_api_key_is_required_when_set(model_dir: Path) -> None:
    with ServerProcess(model_dir, env={"JOBBERT_ONNX_API_KEY": "s3cret-key"}) as keyed:
        assert keyed.post({"input": "x"}).status_code == 401
        wrong = keyed.post({"input": "x"}, headers={"Authorization": "Bearer s3cret-kez"})
        assert wrong.status_code == 401
        assert "Authorization: Bearer" in wrong.json()["error"]["message"]
        assert keyed.post({"input": "x"}, headers={"Authorization": "Basic s3cret-key"}).status_code == 401
        assert keyed.post({"input": "x"}, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        client = OpenAI(base_url=f"{keyed.url}/v1", api_key="s3cret-key")
        assert len(client.embeddings.create(model="jobbert-v3", input="x").data[0].embedding) == 1024
        assert httpx.get(f"{keyed.url}/health").status_code == 200
        assert "s3cret" not in "".join(keyed.log)


def test_sigterm_finishes_in_flight_requests_and_exits_0(model_dir: Path) -> None:
    with ServerProcess(model_dir, "--max-wait-ms", "1500", "--log-texts") as process:
        results: list[httpx.Response] = []
        senders = [
            threading.Thread(target=lambda: results.append(process.post({"input": ["in flight", "too"]})))
            for _ in range(3)
        ]
        for sender in senders:
            sender.start()
        time.sleep(0.5)  # the requests wait in the queue for company
        assert process.terminate() == 0
        for sender in senders:
            sender.join()
        assert [r.status_code for r in results] == [200, 200, 200]
        with pytest.raises(httpx.TransportError):
            process.post({"input": "after shutdown"}, timeout=2)
        assert any("in flight" in line for line in process.log), "--log-texts should log the texts"


def test_texts_are_not_logged_by_default(server: ServerProcess) -> None:
    server.post({"input": "Geheimer Jobtitel"})
    assert not any("Geheimer" in line for line in server.log)


def test_two_workers_share_the_port_and_sum_their_metrics(model_dir: Path) -> None:
    with ServerProcess(model_dir, "--workers", "2") as pool:
        pool.wait_for_log("listening on", 2)  # each worker warms up, then listens
        with ThreadPoolExecutor(4) as threads:
            codes = list(threads.map(lambda i: pool.post({"input": f"title {i}"}).status_code, range(40)))
        assert codes == [200] * 40
        metrics = httpx.get(f"{pool.url}/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith('jobbert_requests_total{code="200",path="/v1/emb'))
        assert float(line.split()[-1]) == 40
        assert pool.terminate() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-queue-texts", "10"], "--max-queue-texts (10) must be at least --max-inputs (2048)"),
        (["--workers", "0"], "--workers must be a positive integer"),
        (["--port", "70000"], "--port must be in [0, 65535]"),
        (["--api-key", " "], "the API key is empty"),
    ],
)
def test_bad_settings_are_refused_before_start(model_dir: Path, args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jobbert_onnx", "serve", str(model_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"jobbert-onnx serve: error: {message}" in result.stderr


def test_a_folder_that_is_not_an_export_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jobbert_onnx", "serve", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "manifest.json" in result.stderr


def test_a_crashed_worker_is_restarted(model_dir: Path) -> None:
    with ServerProcess(model_dir, "--workers", "2") as pool:
        pool.wait_for_log("listening on", 2)
        pids = [int(line.split("(pid ")[1].split(",")[0]) for line in pool.log if "listening on" in line]
        os.kill(pids[0], signal.SIGKILL)
        pool.wait_for_log("listening on", 3)
        assert any("exited with -9; restarting it" in line for line in pool.log)
        pool.wait_ready()
        codes = [pool.post({"input": f"title {i}"}).status_code for i in range(20)]
        assert codes == [200] * 20
        assert pool.terminate() == 0


def test_a_folder_that_is_no_model_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jobbert_onnx", "serve", str(tmp_path), "--port", "0", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "has no manifest.json" in result.stderr and "at start-up" not in result.stderr


def test_workers_that_cannot_start_stop_the_server(tiny_exports: dict, tmp_path: Path) -> None:
    export = Path(shutil.copytree(tiny_exports[("router", "fp32")], tmp_path / "export"))
    pooling = export / "pooling.onnx"
    data = bytearray(pooling.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: the workers' sha256 check refuses it
    pooling.write_bytes(bytes(data))
    result = subprocess.run(
        [sys.executable, "-m", "jobbert_onnx", "serve", str(export), "--port", "0", "--workers", "2",
         "--device", "cpu", "--precision", "fp32"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "pooling.onnx does not match its sha256" in result.stderr and "at start-up; stopping" in result.stderr
