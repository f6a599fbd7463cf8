"""`jobbert-onnx match`: job titles -> the top-k concepts of a taxonomy (e.g. ESCO occupations).

A concept matches through any of its labels (preferred or alternative); its
score is its best label's cosine. Search is exact: queries and labels are
normalized and compared with batched matrix products, a block of labels at a
time, so a million labels fit in memory (the label vectors are memory-mapped).
Label vectors are cached beside the output, keyed by the model's manifest hash
and the taxonomy's content hash, and reused by later runs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobbert_onnx._files import atomic_path
from jobbert_onnx.batch.embed import CHUNK_ROWS
from jobbert_onnx.errors import JobbertOnnxError
from jobbert_onnx.manifest import MANIFEST_NAME, sha256_file
from jobbert_onnx.vectors import normalize

LABEL_BLOCK = 65536
# What a bad query row can do: stop the job, or be left out and reported.
MATCH_BAD_ROW_POLICIES = ("error", "skip")


class MatchError(JobbertOnnxError, ValueError):
    """The taxonomy or the queries cannot be used as given."""


@dataclass(frozen=True)
class Taxonomy:
    """Concepts and their labels, flattened: label i belongs to concept `owner[i]`."""

    concept_ids: list[str]
    labels: list[str]
    owner: np.ndarray
    content_sha256: str

    @property
    def max_labels_per_concept(self) -> int:
        return int(np.bincount(self.owner).max()) if len(self.owner) else 0


def read_taxonomy(
    path: str | Path,
    id_column: str = "concept_uri",
    label_column: str = "preferred_label",
    alt_column: str | None = "alt_labels",
) -> Taxonomy:
    """Read a CSV/TSV of concepts: an id, a label, and optionally `|`-joined alternative labels."""
    path = Path(path)
    if not path.is_file():
        raise MatchError(f"{path} does not exist")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    concept_ids: list[str] = []
    labels: list[str] = []
    owner: list[int] = []
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        header = reader.fieldnames or []
        for name in (id_column, label_column):
            if name not in header:
                raise MatchError(f"{path} has no column {name!r}; its columns are: {', '.join(header)}")
        use_alt = alt_column is not None and alt_column in header
        for record in reader:
            concept = len(concept_ids)
            concept_ids.append(record[id_column])
            names = [record[label_column] or ""]
            if use_alt and record.get(alt_column or ""):
                names += (record[alt_column or ""] or "").split("|")
            seen = set()
            for name in (n.strip() for n in names):
                if name and name not in seen:
                    seen.add(name)
                    labels.append(name)
                    owner.append(concept)
    if not labels:
        raise MatchError(f"{path} has no labels in column {label_column!r}")
    return Taxonomy(concept_ids, labels, np.asarray(owner, dtype=np.int64), sha256_file(path))


def label_vectors(
    taxonomy: Taxonomy,
    model_dir: Path,
    cache_dir: Path,
    encode: Callable[[list[str]], np.ndarray],
    log: Callable[[str], None],
) -> np.ndarray:
    """Normalized label vectors, memory-mapped from the cache (computed once per model and taxonomy)."""
    key = hashlib.sha256(
        (sha256_file(model_dir / MANIFEST_NAME) + taxonomy.content_sha256 + "\n".join(taxonomy.labels[:1])).encode()
    ).hexdigest()[:24]
    cache = cache_dir / f"taxonomy-{key}.npy"
    if cache.is_file():
        log(f"using cached taxonomy vectors {cache}")
        vectors: np.ndarray = np.load(cache, mmap_mode="r")
        if vectors.shape[0] == len(taxonomy.labels):
            return vectors
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"encoding {len(taxonomy.labels)} taxonomy labels (cached in {cache}) ...")
    with atomic_path(cache) as tmp:
        out = None
        for start in range(0, len(taxonomy.labels), LABEL_BLOCK):
            block = normalize(encode(taxonomy.labels[start : start + LABEL_BLOCK]))
            if out is None:
                out = np.lib.format.open_memmap(
                    tmp, mode="w+", dtype=np.float32, shape=(len(taxonomy.labels), block.shape[1])
                )
            out[start : start + len(block)] = block
        assert out is not None
        out.flush()
        del out
    return np.load(cache, mmap_mode="r")


def top_concepts(
    queries: np.ndarray, labels: np.ndarray, owner: np.ndarray, k: int, max_labels_per_concept: int
) -> list[list[tuple[int, int, float]]]:
    """Exact top-k concepts per query: (concept, best label, cosine), best first.

    Keeping the best ``k * max_labels_per_concept`` labels per query is enough:
    those always include the best label of each of the k best concepts.
    """
    queries = normalize(queries)
    keep = min(len(labels), k * max(1, max_labels_per_concept))
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_labels = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(labels), LABEL_BLOCK):
        scores = queries @ np.asarray(labels[start : start + LABEL_BLOCK], dtype=np.float32).T
        take = min(keep, scores.shape[1])
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        best_labels = np.concatenate([best_labels, top + start], axis=1)
        if best_scores.shape[1] > keep:
            cut = np.argpartition(-best_scores, keep - 1, axis=1)[:, :keep]
            best_scores = np.take_along_axis(best_scores, cut, 1)
            best_labels = np.take_along_axis(best_labels, cut, 1)
    results = []
    for scores, label_ids in zip(best_scores, best_labels, strict=True):
        order = np.lexsort((label_ids, -scores))  # score descending, then label order: deterministic ties
        chosen: list[tuple[int, int, float]] = []
        seen: set[int] = set()
        for position in order:
            concept = int(owner[label_ids[position]])
            if concept not in seen:
                seen.add(concept)
                chosen.append((concept, int(label_ids[position]), float(scores[position])))
                if len(chosen) == k:
                    break
        results.append(chosen)
    return results


def write_matches(
    output: Path, queries: list[Any], ids: list[Any], matches: list[list[tuple[int, int, float]]], taxonomy: Taxonomy
) -> None:
    """CSV (one row per query and rank) or JSONL (one line per query), written atomically."""
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        if output.suffix.lower() == ".jsonl":
            for row_id, query, found in zip(ids, queries, matches, strict=True):
                hits = [
                    {
                        "rank": r + 1,
                        "concept_id": taxonomy.concept_ids[c],
                        "label": taxonomy.labels[label],
                        "score": round(s, 6),
                    }
                    for r, (c, label, s) in enumerate(found)
                ]
                handle.write(json.dumps({"id": row_id, "query": query, "matches": hits}, ensure_ascii=False) + "\n")
        else:
            writer = csv.writer(handle)
            writer.writerow(["id", "query", "rank", "concept_id", "label", "score"])
            for row_id, query, found in zip(ids, queries, matches, strict=True):
                for r, (c, label, s) in enumerate(found):
                    writer.writerow([row_id, query, r + 1, taxonomy.concept_ids[c], taxonomy.labels[label], f"{s:.6f}"])


def run_match(
    model_dir: str,
    queries_path: str,
    taxonomy_path: str,
    output: str,
    *,
    top_k: int = 10,
    column: str | None = None,
    id_column: str | None = None,
    label_column: str = "preferred_label",
    alt_column: str | None = "alt_labels",
    concept_id_column: str = "concept_uri",
    on_bad_row: str = "error",
    batch_size: int | None = None,
    device: str = "auto",
    precision: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict[str, Any]:
    """Match every query to its top-k taxonomy concepts; returns counts for the caller to report."""
    from jobbert_onnx.batch.embed import clean_rows
    from jobbert_onnx.batch.reader import TableReader
    from jobbert_onnx.runtime import Encoder

    out_path = Path(output)
    if out_path.suffix.lower() not in (".csv", ".jsonl"):
        raise MatchError(f"{output}: write .csv or .jsonl")
    if top_k < 1:
        raise MatchError(f"--top-k must be positive; got {top_k}")
    if on_bad_row not in MATCH_BAD_ROW_POLICIES:
        raise MatchError(f"--on-bad-row must be one of {', '.join(MATCH_BAD_ROW_POLICIES)}; got {on_bad_row!r}")
    taxonomy = read_taxonomy(taxonomy_path, concept_id_column, label_column, alt_column)
    encoder = Encoder.load(model_dir, device=device, precision=precision)

    def encode(texts: list[str]) -> np.ndarray:
        return encoder.encode(texts, task="anchor", batch_size=batch_size)

    cache_dir = out_path.parent / ".jobbert-onnx-cache"
    labels = label_vectors(taxonomy, Path(model_dir), cache_dir, encode, log)
    reader = TableReader(queries_path, column, id_column)
    all_ids: list[Any] = []
    all_queries: list[Any] = []
    matches: list[list[tuple[int, int, float]]] = []
    skipped = []
    for rows in reader.chunks(chunk_rows):
        texts, keep, notes = clean_rows(rows, on_bad_row)
        skipped += notes["skipped"]
        found = (
            top_concepts(encode(texts), labels, taxonomy.owner, top_k, taxonomy.max_labels_per_concept) if texts else []
        )
        all_ids += [rows.ids[i] for i in keep]
        all_queries += [rows.cells[i] if isinstance(rows.cells[i], str) else "" for i in keep]
        matches += found
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_matches(out_path, all_queries, all_ids, matches, taxonomy)
    return {
        "queries": len(all_queries),
        "skipped": skipped,
        "concepts": len(taxonomy.concept_ids),
        "labels": len(taxonomy.labels),
    }
