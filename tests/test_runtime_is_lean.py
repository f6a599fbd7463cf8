"""The runtime needs numpy, tokenizers and onnxruntime only.

No torch, transformers, optimum or sentence-transformers on its import path.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import jobbert_onnx
from jobbert_onnx import ManifestError

HEAVY = ("torch", "transformers", "optimum", "sentence_transformers")
PACKAGE = Path(jobbert_onnx.__file__).parent


def test_loading_and_encoding_imports_no_heavy_framework(tiny_exports: dict) -> None:
    folder = tiny_exports[("router", "fp32")]
    script = f"""
import json, sys
from jobbert_onnx import Encoder
enc = Encoder.load({str(folder)!r}, device="cpu")
vectors = enc.encode(["Software Engineer", "python, sql"], task="positive")
assert vectors.shape == (2, 1024)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == [], f"the runtime imported {loaded}"


def test_runtime_sources_import_only_the_lean_stack() -> None:
    ground_floor = ("manifest.py", "errors.py", "_files.py", "vectors.py", "hub.py")
    files = [*sorted((PACKAGE / "runtime").glob("*.py")), *(PACKAGE / name for name in ground_floor)]
    allowed = {"numpy", "tokenizers", "onnxruntime", "jobbert_onnx", "__future__"}
    # hub.py builds its errors from huggingface_hub's, inside a function (only reached where a hub id was
    # used, so huggingface_hub is there).
    deferred = {"hub.py": {"huggingface_hub.errors"}}
    # The layers above: resolving a source and exporting on a cache miss. Nothing here reaches up to them,
    # not even inside a function.
    above = ("jobbert_onnx.export", "jobbert_onnx.cache", "jobbert_onnx.loading", "jobbert_onnx.batch")
    for path in files:
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert not name.startswith(above), f"{path.name} imports {name}, a layer above the runtime"
                if name in deferred.get(path.name, ()) and id(node) not in top_level:
                    continue
                root = name.split(".")[0]
                assert root in allowed or root in sys.stdlib_module_names, f"{path.name} imports {name}"


def test_the_runtime_loads_export_folders_only(tiny_models: dict, tiny_exports: dict) -> None:
    """Hub ids and sentence-transformers folders are the package's `Encoder.load` (tests/test_cache.py)."""
    from jobbert_onnx import Encoder, runtime

    with pytest.raises(ManifestError, match="jobbert-onnx export"):
        runtime.Encoder.load(tiny_models["router"], device="cpu")
    encoder = Encoder.load(tiny_exports[("router", "fp32")], device="cpu")
    assert isinstance(encoder, Encoder) and encoder.encode("Data Scientist").shape == (1024,)
