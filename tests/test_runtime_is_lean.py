"""The runtime needs numpy, tokenizers and onnxruntime only.

No torch, transformers, optimum or sentence-transformers on its import path.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import jobbert_onnx

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
    ground_floor = ("manifest.py", "__init__.py", "errors.py", "_files.py", "vectors.py", "cache.py")
    files = [*sorted((PACKAGE / "runtime").glob("*.py")), *(PACKAGE / name for name in ground_floor)]
    allowed = {"numpy", "tokenizers", "onnxruntime", "jobbert_onnx", "__future__"}
    # The cache exports on a first load by hub id or folder: only there, inside a function, and
    # with an error naming the [export] extra where it is missing (tests/test_cache.py).
    deferred = {"cache.py": {"jobbert_onnx.export", "huggingface_hub", "huggingface_hub.errors"}}
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
                if name in deferred.get(path.name, ()) and id(node) not in top_level:
                    continue
                root = name.split(".")[0]
                if name.startswith("jobbert_onnx.export"):
                    raise AssertionError(f"{path.name} imports the exporter ({name})")
                assert root in allowed or root in sys.stdlib_module_names, f"{path.name} imports {name}"
