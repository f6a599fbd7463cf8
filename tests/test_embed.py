"""`jobbert-onnx embed`: every format, every row accounted for, resumable to an identical file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobbert_onnx import Encoder, samples
from jobbert_onnx.batch.embed import EmbedError, EmbedJob, local_encoder, partial_folder, report_path, run_embed
from jobbert_onnx.batch.reader import InputError

ROOT = Path(__file__).resolve().parent.parent


def _titles(n: int) -> list[str]:
    pool = samples.titles("en") + samples.titles("de") + samples.titles("zh")
    return [pool[(i * 7919) % len(pool)] for i in range(n)]


def _job(model: Path, source: Path, output: Path, **options: object) -> EmbedJob:
    defaults: dict = {"task": "anchor", "chunk_rows": 16, "precision": "fp32"}
    return EmbedJob(model_dir=str(model), input=str(source), output=str(output), **(defaults | options))


def _run(job: EmbedJob, **options: object):  # type: ignore[no-untyped-def]
    encode = local_encoder(job.model_dir, job.task, job.batch_size, "cpu", job.precision)
    return run_embed(job, encode, log=lambda _: None, **options)


@pytest.fixture(scope="module")
def model(tiny_exports: dict) -> Path:
    return Path(tiny_exports[("router", "fp32")])


@pytest.fixture(scope="module")
def expected(model: Path) -> np.ndarray:
    return Encoder.load(model, device="cpu", precision="fp32").encode(_titles(50), task="anchor")


def _write_inputs(folder: Path, texts: list[str]) -> dict[str, Path]:
    paths = {
        "txt": folder / "in.txt",
        "csv": folder / "in.csv",
        "tsv": folder / "in.tsv",
        "jsonl": folder / "in.jsonl",
        "parquet": folder / "in.parquet",
    }
    paths["txt"].write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    for kind, sep in (("csv", ","), ("tsv", "\t")):
        import csv

        with open(paths[kind], "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter=sep)
            writer.writerow(["key", "title"])
            writer.writerows([f"k{i}", t] for i, t in enumerate(texts))
    paths["jsonl"].write_text("".join(json.dumps({"key": f"k{i}", "title": t}) + "\n" for i, t in enumerate(texts)))
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(len(texts))], "title": texts}), paths["parquet"])
    return paths


@pytest.mark.parametrize("kind", ["txt", "csv", "tsv", "jsonl", "parquet"])
def test_every_input_format_to_parquet(model: Path, expected: np.ndarray, tmp_path: Path, kind: str) -> None:
    texts = _titles(50)
    source = _write_inputs(tmp_path, texts)[kind]
    columns = {} if kind == "txt" else {"column": "title", "id_column": "key"}
    report = _run(_job(model, source, tmp_path / "out.parquet", **columns))
    assert (report.rows_in, report.rows_out, report.skipped) == (50, 50, [])
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("text").to_pylist() == texts
    assert table.column("id").to_pylist() == (list(range(50)) if kind == "txt" else [f"k{i}" for i in range(50)])
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 1024)
    vectors = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    assert not partial_folder(tmp_path / "out.parquet").exists()
    assert json.loads(report_path(tmp_path / "out.parquet").read_text())["rows_out"] == 50


def test_npy_with_ids_and_float16(model: Path, expected: np.ndarray, tmp_path: Path) -> None:
    source = _write_inputs(tmp_path, _titles(50))["jsonl"]
    _run(_job(model, source, tmp_path / "v.npy", column="title", id_column="key", dtype="float16"))
    vectors = np.load(tmp_path / "v.npy")
    assert vectors.dtype == np.float16 and vectors.shape == (50, 1024)
    np.testing.assert_allclose(vectors.astype(np.float32), expected, atol=2e-3)
    ids = [json.loads(line) for line in (tmp_path / "v.ids.jsonl").read_text().splitlines()]
    assert ids == [f"k{i}" for i in range(50)]


def test_bad_rows_follow_the_policy(model: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    cells = ["Koch", None, "", 42, "   ", "Chef"]
    source.write_text("".join(json.dumps({"text": c}) + "\n" for c in cells))
    with pytest.raises(EmbedError, match=r"row 1 \(id 1\) is null; .*--on-bad-row skip"):
        _run(_job(model, source, tmp_path / "a.parquet"))
    report = _run(_job(model, source, tmp_path / "b.parquet", on_bad_row="skip"))
    assert (report.rows_in, report.rows_out) == (6, 2)
    assert [(s["row"], s["reason"]) for s in report.skipped] == [
        (1, "null"), (2, "empty"), (3, "not text (int)"), (4, "empty"),
    ]  # fmt: skip
    assert pq.read_table(tmp_path / "b.parquet").column("id").to_pylist() == [0, 5]
    report = _run(_job(model, source, tmp_path / "c.parquet", on_bad_row="empty"))
    assert (report.rows_in, report.rows_out, len(report.embedded_as_empty)) == (6, 6, 4)


def test_errors_name_the_fix(model: Path, tmp_path: Path) -> None:
    paths = _write_inputs(tmp_path, _titles(5))
    with pytest.raises(InputError, match="has no column 'body'; its columns are: key, title"):
        _run(_job(model, paths["csv"], tmp_path / "o.parquet", column="body"))
    with pytest.raises(InputError, match="several columns .* choose one with --column"):
        _run(_job(model, paths["csv"], tmp_path / "o.parquet"))
    with pytest.raises(EmbedError, match="write .parquet or .npy"):
        _run(_job(model, paths["txt"], tmp_path / "o.csv"))
    _run(_job(model, paths["txt"], tmp_path / "o.parquet"))
    with pytest.raises(EmbedError, match="exists; pass --overwrite"):
        _run(_job(model, paths["txt"], tmp_path / "o.parquet"))


def _cli_embed(model: Path, source: Path, output: Path, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "jobbert_onnx.cli", "embed", str(model), str(source), str(output)]
    command += ["--task", "anchor", "--device", "cpu", "--precision", "fp32", "--chunk-rows", "64", "--quiet", *extra]
    # A shell's background job starts with SIGINT ignored, which children inherit: restore the default, as a
    # terminal gives it, so that Ctrl-C is what the test sends wherever the suite runs.
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _parts_done(output: Path) -> int:
    return len(list(partial_folder(output).glob("part-*.report.json")))


@pytest.mark.slow
def test_killed_runs_resume_to_an_identical_file(model: Path, tmp_path: Path) -> None:
    """SIGKILL at several points, resume each time: the file equals an uninterrupted run's, byte for byte."""
    source = tmp_path / "in.txt"
    source.write_text("".join(t + "\n" for t in _titles(12000)))
    clean = _cli_embed(model, source, tmp_path / "clean.parquet")
    assert clean.wait(timeout=300) == 0, clean.communicate()[1]

    output = tmp_path / "resumed.parquet"
    kills = []
    for attempt in range(4):
        process = _cli_embed(model, source, output, *(["--resume"] if attempt else []))
        target = _parts_done(output) + 5 + 7 * attempt  # a different point each time
        deadline = time.monotonic() + 120
        while process.poll() is None and _parts_done(output) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        if process.poll() is not None:
            break
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        kills.append(_parts_done(output))
        assert not output.exists(), "no half-written output is ever taken for a finished one"
    final = _cli_embed(model, source, output, "--resume")
    assert final.wait(timeout=300) == 0, final.communicate()[1]
    assert len(kills) >= 3 and kills == sorted(kills), f"killed after parts {kills}: too few kills to prove anything"
    assert output.read_bytes() == (tmp_path / "clean.parquet").read_bytes()
    assert pq.read_table(output).column("id").to_pylist() == list(range(12000))


def test_resume_refuses_a_different_job(model: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("".join(t + "\n" for t in _titles(40)))
    output = tmp_path / "o.parquet"
    partial_folder(output).mkdir()
    (partial_folder(output) / "job.json").write_text(json.dumps({"task": "positive"}))
    with pytest.raises(EmbedError, match="holds an interrupted run .* pass --resume"):
        _run(_job(model, source, output))
    with pytest.raises(EmbedError, match="cannot resume: .*task"):
        _run(_job(model, source, output), resume=True)


@pytest.mark.slow
@pytest.mark.ray
def test_ray_gives_the_same_file(model: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("".join(t + "\n" for t in _titles(300)))
    local = _cli_embed(model, source, tmp_path / "local.parquet")
    assert local.wait(timeout=300) == 0
    ray = _cli_embed(model, source, tmp_path / "ray.parquet", "--ray")
    _out, err = ray.communicate(timeout=600)
    assert ray.returncode == 0, err[-3000:]
    assert (tmp_path / "ray.parquet").read_bytes() == (tmp_path / "local.parquet").read_bytes()


def test_ctrl_c_stops_cleanly_and_resumes(model: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("".join(t + "\n" for t in _titles(12000)))
    output = tmp_path / "o.parquet"
    process = _cli_embed(model, source, output)
    deadline = time.monotonic() + 120
    while process.poll() is None and _parts_done(output) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the job finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "continue with the same command and --resume" in err and not output.exists()
    resumed = _cli_embed(model, source, output, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1]
    assert pq.read_table(output).column("id").to_pylist() == list(range(12000))


def test_no_progress_bar_in_a_pipe(model: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("".join(t + "\n" for t in _titles(100)))
    command = [sys.executable, "-m", "jobbert_onnx.cli", "embed", str(model), str(source), str(tmp_path / "o.npy")]
    done = subprocess.run([*command, "--task", "anchor", "--device", "cpu"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "embedded 100 of 100 rows" in done.stderr


def test_a_part_whose_report_was_cut_short_is_redone(model: Path, tmp_path: Path) -> None:
    """A kill while a part's report is written must not break the resume (found by the kill test under load)."""
    source = tmp_path / "in.txt"
    source.write_text("".join(t + "\n" for t in _titles(80)))
    clean = _job(model, source, tmp_path / "clean.parquet")
    _run(clean)

    job = _job(model, source, tmp_path / "out.parquet")
    encode = local_encoder(job.model_dir, job.task, job.batch_size, "cpu", job.precision)

    def stop_after_three(chunks):  # type: ignore[no-untyped-def]
        for done, vectors in enumerate(encode(chunks)):
            if done == 3:
                raise KeyboardInterrupt
            yield vectors

    with pytest.raises(KeyboardInterrupt):
        run_embed(job, stop_after_three, log=lambda _: None)
    parts = partial_folder(Path(job.output))
    (parts / "part-000002.report.json").write_text("")  # as a kill in the middle of writing it left it
    _run(job, resume=True)
    assert Path(job.output).read_bytes() == (tmp_path / "clean.parquet").read_bytes()
