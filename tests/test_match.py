"""`jobbert-onnx match`: exact top-k over any label of a concept, cached taxonomy vectors.

The models here have RANDOM weights, so these tests prove the wiring (labels,
concepts, ranks, cache, cross-file concept ids), not matching accuracy.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobbert_onnx.batch.match import MatchError, read_taxonomy, run_match, top_concepts

DATA = Path(__file__).resolve().parent / "data"
TAXONOMY = DATA / "esco_occupations_en_sample.tsv"


def _rows(lang: str) -> list[dict[str, str]]:
    with open(DATA / f"esco_occupations_{lang}_sample.tsv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_taxonomy_flattens_every_label() -> None:
    taxonomy = read_taxonomy(TAXONOMY)
    rows = _rows("en")
    assert taxonomy.concept_ids == [r["concept_uri"] for r in rows]
    first = [taxonomy.labels[i] for i in np.flatnonzero(taxonomy.owner == 0)]
    assert first[0] == rows[0]["preferred_label"]
    assert set(first[1:]) <= {a.strip() for a in rows[0]["alt_labels"].split("|")}
    assert taxonomy.max_labels_per_concept >= 2


def test_top_concepts_is_exact_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(40), rng.integers(1, 6, size=40))
    labels = rng.standard_normal((len(owner), 16)).astype(np.float32)
    labels /= np.linalg.norm(labels, axis=1, keepdims=True)
    queries = rng.standard_normal((25, 16)).astype(np.float32)
    got = top_concepts(queries, labels, owner, k=5, max_labels_per_concept=int(np.bincount(owner).max()))
    scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ labels.T
    for q, found in enumerate(got):
        best = {c: scores[q][owner == c].max() for c in range(40)}
        want = sorted(best, key=lambda c: -best[c])[:5]
        assert [c for c, _, _ in found] == want
        for concept, label, score in found:
            assert owner[label] == concept and np.isclose(score, best[concept], atol=1e-5)


def test_identical_strings_match_their_own_concept_first(tiny_exports: dict, tmp_path: Path) -> None:
    """German and Spanish queries against their own language's taxonomy, joined back to English by URI."""
    model = tiny_exports[("router", "fp32")]
    for lang in ("de", "es"):
        rows = _rows(lang)[:60]
        queries = tmp_path / f"queries_{lang}.csv"
        with open(queries, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["uri", "title"])
            writer.writerows([r["concept_uri"], r["preferred_label"]] for r in rows)
        output = tmp_path / f"matches_{lang}.jsonl"
        summary = run_match(
            str(model), str(queries), str(DATA / f"esco_occupations_{lang}_sample.tsv"), str(output),
            top_k=3, column="title", id_column="uri", device="cpu", precision="fp32", log=lambda _: None,
        )  # fmt: skip
        assert summary["queries"] == 60
        english = {r["concept_uri"] for r in _rows("en")}
        for line in output.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            top = record["matches"][0]
            assert top["label"] == record["query"] and top["score"] > 0.9999
            assert top["concept_id"] == record["id"], f"{record['query']!r} did not match its own concept first"
            assert top["concept_id"] in english, "concept URIs are shared across languages"
            assert [m["rank"] for m in record["matches"]] == [1, 2, 3]


def test_taxonomy_vectors_are_cached_and_reused(tiny_exports: dict, tmp_path: Path) -> None:
    model = tiny_exports[("router", "fp32")]
    queries = tmp_path / "q.txt"
    queries.write_text("software developer\nKoch\n")
    logs: list[str] = []
    for _ in range(2):
        run_match(str(model), str(queries), str(TAXONOMY), str(tmp_path / "m.csv"), device="cpu", log=logs.append)
    assert any("encoding" in line for line in logs[:1]) and any("using cached" in line for line in logs[1:])
    cached = list((tmp_path / ".jobbert-onnx-cache").glob("taxonomy-*.npy"))
    assert len(cached) == 1
    with open(tmp_path / "m.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 20 and [r["rank"] for r in rows[:10]] == [str(i) for i in range(1, 11)]


def test_cli_and_errors(tiny_exports: dict, tmp_path: Path) -> None:
    model = str(tiny_exports[("router", "fp32")])
    queries = tmp_path / "q.txt"
    queries.write_text("Koch\n")
    command = [sys.executable, "-m", "jobbert_onnx.cli", "match", model, str(queries), str(TAXONOMY)]
    done = subprocess.run(
        [*command, str(tmp_path / "m.jsonl"), "--top-k", "2", "--device", "cpu"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert len(json.loads((tmp_path / "m.jsonl").read_text())["matches"]) == 2
    done = subprocess.run([*command, str(tmp_path / "m.txt")], capture_output=True, text=True)
    assert done.returncode == 1 and "write .csv or .jsonl" in done.stderr
    with pytest.raises(MatchError, match="has no column 'label'"):
        read_taxonomy(TAXONOMY, label_column="label")
