"""The GPU proof's export under the GPU machine's versions, here on the CPU.

The device image (the device tool's KINDS.md) has transformers 5.17.0, sentence-transformers
6.0.1, tokenizers 0.23.2 and onnx 1.23.1, where this project's environment has newer
releases; the staged onnxruntime-gpu is 1.31.1, as here. A virtual environment of those
versions (PyPI; kept under the work folder) runs the proof's quick rehearsal: its export
(fp16 with the merged graph, validated) is made by the device's transformers, so a
difference in what the optimizer fuses, or a failing validation, shows here rather than
there. torch stays 2.13.0: the image's torch 2.11.0+cu130 has no CPU build on PyPI (the
encoder is traced with the TorchScript exporter, `dynamo=False`).

    python tests/heldout/device_versions.py WORK [REFERENCE_EXPORT]

prints one JSON object: the versions the export ran with, its fp16 nodes and validation,
and, given an export of the same tiny model made in this project's environment, whether
the fused graphs hold the same nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from venvs import virtual_environment  # noqa: E402

DEVICE_PACKAGES = (
    "transformers==5.17.0",
    "sentence-transformers==6.0.1",
    "tokenizers==0.23.2",
    "onnx==1.23.1",
    "onnxruntime==1.31.1",
)
TORCH = "torch==2.13.0"  # the CPU build this project is set up with (see the module's note)
OTHERS = ("numpy", "safetensors", "sympy", "packaging", "nvidia-ml-py", "psutil")


def environment(work: Path) -> Path:
    """The device-versions environment (made once); its python."""
    installs = ([TORCH], [*DEVICE_PACKAGES, *OTHERS], ["--no-deps", "-e", str(ROOT)])
    return virtual_environment(work / "device-versions-venv", installs)


def fp16_facts(export: Path) -> dict[str, Any]:
    """What the quick rehearsal's export holds: versions, fp16 nodes (encoder and merged graph), validation."""
    manifest = json.loads((export / "manifest.json").read_text())
    fp16 = manifest["variants"]["fp16"]
    return {
        "versions": manifest["versions"],
        "nodes": fp16["nodes"],
        "merged_nodes": fp16.get("merged_nodes"),
        "validation": {head: round(f["min_cosine"], 7) for head, f in fp16["validation"]["heads"].items()},
        "passed": manifest["validation"]["passed"],
    }


def check(work: Path, reference: Path | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    python = environment(work)
    built = time.perf_counter() - started
    out, proof_work = work / "device-versions-out", work / "device-versions-proof"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv = [str(python), "-m", "benchmarks.gpu.proof", str(out), "--rehearse", "--quick", "--work", str(proof_work)]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    steps = json.loads((out / "proof.json").read_text())["steps"] if (out / "proof.json").is_file() else {}
    result: dict[str, Any] = {
        "environment_s": round(built, 1),
        "proof_exit": done.returncode,
        "steps": {name: step["status"] for name, step in steps.items()},
    }
    if (proof_work / "export" / "manifest.json").is_file():
        result["export"] = fp16_facts(proof_work / "export")
    if reference is not None and "export" in result:
        ours = fp16_facts(reference)
        result["reference_versions"] = ours["versions"]
        result["same_nodes"] = (ours["nodes"], ours["merged_nodes"]) == (
            result["export"]["nodes"],
            result["export"]["merged_nodes"],
        )
    return result


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        raise SystemExit("usage: python tests/heldout/device_versions.py WORK [REFERENCE_EXPORT]")
    result = check(Path(argv[0]), Path(argv[1]) if len(argv) > 1 else None)
    print(json.dumps(result, indent=2))
    return 0 if result["proof_exit"] == 0 and result.get("same_nodes", True) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
