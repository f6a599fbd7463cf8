"""Load a model with one sentence-transformers release, save it, and write that release's vectors.

Runs inside a virtual environment of the release under test (`save_formats.py` makes them), so
it imports nothing of this project: only sentence-transformers, numpy and the standard library.

    python st_save.py SOURCE SAVED TEXTS.json OUT_FOLDER
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

TASKS = ("anchor", "positive")


def encode(model: SentenceTransformer, texts: list[str], task: str) -> np.ndarray:
    """`task`'s vectors: encode(task=...) from 5.0 on; before, the Asym's keys in dict inputs (3.x and
    4.x take task= too, into their **kwargs, and return the pooled vectors)."""
    if int(metadata.version("sentence-transformers").split(".")[0]) >= 5:
        return model.encode(texts, task=task, batch_size=8, convert_to_numpy=True)
    return model.encode([{task: text} for text in texts], batch_size=8, convert_to_numpy=True)


def main(source: str, saved: str, texts_file: str, out: str) -> None:
    texts = json.loads(Path(texts_file).read_text(encoding="utf-8"))
    SentenceTransformer(source, device="cpu").save(saved)
    model = SentenceTransformer(saved, device="cpu")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        np.save(folder / f"{task}.npy", encode(model, texts, task).astype(np.float32))
    versions = {
        name: metadata.version(name) for name in ("sentence-transformers", "transformers", "torch", "tokenizers")
    }
    (folder / "versions.json").write_text(json.dumps(versions, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
