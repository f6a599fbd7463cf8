"""`jobbert-onnx embed`: a file of texts -> a file of vectors, streamed, accounted for, resumable.

The input is read in chunks of `chunk_rows`; each chunk is encoded and written
as a numbered part under ``OUTPUT.partial/``, beside a `job.json` that records
what the job is (input fingerprint, model, options). `--resume` checks that
record and continues after the last complete part; chunk boundaries are fixed,
so the assembled file is identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jobbert_onnx._files import write_json
from jobbert_onnx.batch.reader import Rows, TableReader, fingerprint
from jobbert_onnx.batch.writer import OUTPUT_SUFFIXES, assemble, part_name, write_part
from jobbert_onnx.errors import JobbertOnnxError
from jobbert_onnx.manifest import MANIFEST_NAME, sha256_file
from jobbert_onnx.runtime.progress import Progress
from jobbert_onnx.runtime.tuning import Tuning

BAD_ROW_POLICIES = ("error", "skip", "empty")
OUTPUT_DTYPES = ("float32", "float16")
# Rows read, encoded and written together (the unit of resuming).
CHUNK_ROWS = 8192
EncodeChunk = Callable[[list[str]], np.ndarray]


class EmbedError(JobbertOnnxError, ValueError):
    """The job cannot run as asked, or stopped on a bad row."""


@dataclass(frozen=True)
class EmbedJob:
    """What an embed job is; two runs with equal jobs produce identical files."""

    model_dir: str
    input: str
    output: str
    task: str
    column: str | None = None
    id_column: str | None = None
    dtype: str = "float32"
    on_bad_row: str = "error"
    chunk_rows: int = CHUNK_ROWS
    batch_size: int | None = None
    precision: str | None = None

    def check(self) -> None:
        if Path(self.output).suffix.lower() not in OUTPUT_SUFFIXES:
            raise EmbedError(f"{self.output}: write .parquet or .npy (got {Path(self.output).suffix or 'no suffix'})")
        if self.dtype not in OUTPUT_DTYPES:
            raise EmbedError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}; got {self.dtype!r}")
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise EmbedError(f"--on-bad-row must be one of {', '.join(BAD_ROW_POLICIES)}; got {self.on_bad_row!r}")
        if self.chunk_rows < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise EmbedError("--chunk-rows and --batch-size must be positive")


@dataclass
class Report:
    """Every input row is accounted for: written, or listed here with the reason."""

    rows_in: int = 0
    rows_out: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    embedded_as_empty: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def bad_reason(cell: Any) -> str | None:
    """Why a cell cannot be embedded as it is, or None if it is a usable text."""
    if cell is None:
        return "null"
    if not isinstance(cell, str):
        return f"not text ({type(cell).__name__})"
    if not cell.strip():
        return "empty"
    return None


def partial_folder(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def report_path(output: Path) -> Path:
    return output.with_name(output.name + ".report.json")


def _job_record(job: EmbedJob) -> dict[str, Any]:
    record = asdict(job)
    record["input_fingerprint"] = fingerprint(Path(job.input))
    record["model_manifest_sha256"] = sha256_file(Path(job.model_dir) / MANIFEST_NAME)
    return record


def _prepare(job: EmbedJob, resume: bool, overwrite: bool) -> tuple[Path, int]:
    """The parts folder, and how many parts are already done."""
    output = Path(job.output)
    parts = partial_folder(output)
    record = _job_record(job)
    if output.exists() and not overwrite and not (resume and parts.is_dir()):
        raise EmbedError(f"{output} exists; pass --overwrite to replace it")
    if parts.is_dir() and not resume:
        raise EmbedError(
            f"{parts} holds an interrupted run of this output; pass --resume to continue it, "
            "or delete that folder to start over"
        )
    if parts.is_dir() and (parts / "job.json").is_file():
        found = json.loads((parts / "job.json").read_text())
        changed = [key for key in record if found.get(key) != record[key]]
        if changed:
            raise EmbedError(
                f"cannot resume: {', '.join(changed)} differ from the interrupted run in {parts}; "
                "run with the same input, model and options, or delete that folder to start over"
            )
        done = 0
        suffix = output.suffix.lower()
        while _part_done(parts, done, suffix):
            done += 1
        return parts, done
    output.parent.mkdir(parents=True, exist_ok=True)
    parts.mkdir(exist_ok=True)
    write_json(parts / "job.json", record)
    return parts, 0


def _part_done(parts: Path, index: int, suffix: str) -> bool:
    """A part counts as done when its vectors and its readable report are both there."""
    if not (parts / part_name(index, suffix)).is_file():
        return False
    try:
        notes = json.loads((parts / part_name(index, ".report.json")).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(notes, dict) and "rows" in notes


def run_embed(
    job: EmbedJob,
    encode_chunks: Callable[[Iterator[list[str]]], Iterator[np.ndarray]],
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> Report:
    """Run (or resume) an embed job.

    Args:
        job: What to embed and how.
        encode_chunks: Turns a stream of text lists into a stream of vector
            matrices, in order (one process, or a Ray cluster).
        resume: Continue an interrupted run of the same job.
        overwrite: Replace an existing output file.
        progress: Draw a progress bar with rate and ETA on stderr.

    Raises:
        EmbedError: Bad options, a job that cannot resume, or a bad row under ``--on-bad-row error``.
    """
    job.check()
    started = time.perf_counter()
    reader = TableReader(job.input, job.column, job.id_column)
    output = Path(job.output)
    suffix = output.suffix.lower()
    parts, done = _prepare(job, resume, overwrite)
    if done:
        log(f"resuming after {done} finished part(s)")
    # Counting takes a pass over the input; only the progress bar needs the total.
    total = reader.count() if progress else 0
    bar = Progress(total, progress, label="Embedding")
    bar.update(min(done * job.chunk_rows, total))

    pending = (rows for index, rows in enumerate(reader.chunks(job.chunk_rows)) if index >= done)
    cleaned: list[tuple[Rows, list[int], dict[str, list]]] = []

    def texts_of_chunks() -> Iterator[list[str]]:
        for rows in pending:
            texts, keep, notes = clean_rows(rows, job.on_bad_row)
            cleaned.append((rows, keep, notes))
            yield texts

    index = done
    dtype = np.float16 if job.dtype == "float16" else np.float32
    try:
        for vectors in encode_chunks(texts_of_chunks()):
            rows, keep, notes = cleaned.pop(0)
            ids = [rows.ids[i] for i in keep]
            cells = [rows.cells[i] for i in keep]
            vectors = np.asarray(vectors, dtype=dtype)
            if vectors.shape[0] != len(keep):
                raise EmbedError(f"part {index}: {len(keep)} texts but {vectors.shape[0]} vectors came back")
            write_part(parts, index, suffix, ids, cells, vectors)
            # The part's report is written after the part: a part counts as done only with both.
            write_json(parts / part_name(index, ".report.json"), {"rows": len(rows.cells), **notes})
            index += 1
            bar.update(len(rows.cells))
    except KeyboardInterrupt:
        bar.close()
        log(f"interrupted after {index} part(s); continue with the same command and --resume")
        raise
    bar.close()

    report = Report()
    for part in range(index):
        notes = json.loads((parts / part_name(part, ".report.json")).read_text())
        report.rows_in += notes["rows"]
        report.skipped += notes["skipped"]
        report.embedded_as_empty += notes["embedded_as_empty"]
    if index == 0:
        raise EmbedError(f"{job.input} has no rows")
    report.rows_out = assemble(parts, index, suffix, output)
    if report.rows_out + len(report.skipped) != report.rows_in:
        raise EmbedError(
            f"row count mismatch: {report.rows_in} in, {report.rows_out} out, {len(report.skipped)} skipped"
        )
    report.seconds = time.perf_counter() - started
    write_json(report_path(output), asdict(report))
    shutil.rmtree(parts)
    return report


def clean_rows(rows: Rows, policy: str) -> tuple[list[str], list[int], dict[str, list]]:
    """Texts to encode, the row positions they come from, and the notes on bad rows."""
    texts, keep = [], []
    notes: dict[str, list] = {"skipped": [], "embedded_as_empty": []}
    for position, cell in enumerate(rows.cells):
        reason = bad_reason(cell)
        if reason is None:
            texts.append(cell)
            keep.append(position)
            continue
        entry = {"row": rows.start + position, "id": _jsonable(rows.ids[position]), "reason": reason}
        if policy == "error":
            raise EmbedError(
                f"row {entry['row']} (id {entry['id']!r}) is {reason}; fix the input, or pass "
                "--on-bad-row skip (leave it out, listed in the report) or --on-bad-row empty (embed it as '')"
            )
        if policy == "skip":
            notes["skipped"].append(entry)
        else:
            notes["embedded_as_empty"].append(entry)
            texts.append("")
            keep.append(position)
    return texts, keep, notes


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (int, str, float)) or value is None else str(value)


def local_encoder(
    model_dir: str, task: str, batch_size: int | None, device: str, precision: str | None, tuning: Tuning | None = None
) -> Callable[[Iterator[list[str]]], Iterator[np.ndarray]]:
    """encode_chunks for one process: the runtime's Encoder, loaded once (each chunk's repeated
    texts are encoded once, unless `tuning` turns dedup off)."""
    from jobbert_onnx.runtime import Encoder

    encoder = Encoder.load(model_dir, device=device, precision=precision, tuning=tuning)
    route = encoder.resolve_task(task)

    def encode_chunks(chunks: Iterator[list[str]]) -> Iterator[np.ndarray]:
        for texts in chunks:
            if texts:
                yield encoder.encode(texts, task=route, batch_size=batch_size)
            else:
                yield np.empty((0, encoder.get_sentence_embedding_dimension()), dtype=np.float32)

    return encode_chunks
