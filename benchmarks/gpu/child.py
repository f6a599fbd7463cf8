"""Start one of the GPU proof's commands, after checking which onnxruntime it imports.

    python -m benchmarks.gpu.child MODULE [ARGS ...]     # runs ``python -m MODULE ARGS ...``

The proof records the onnxruntime it imported (version and file) in the
environment (`benchmarks.worker.SAME_ONNXRUNTIME_ENV`); a child that finds
another one stops before it runs, naming both. On the GPU machine that is the
image's CPU-only build found in place of the staged onnxruntime-gpu: every
CUDA figure the child would report would be the CPU's, or missing. A child
dies with the proof (`benchmarks.worker.die_with_parent`), so a proof killed at
the device's time limit leaves nothing running on the GPU nor writing to OUT.
"""

from __future__ import annotations

import runpy
import sys

from benchmarks.worker import check_onnxruntime, die_with_parent


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m benchmarks.gpu.child MODULE [ARGS ...]")
    die_with_parent()
    check_onnxruntime()
    module, *args = argv
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
