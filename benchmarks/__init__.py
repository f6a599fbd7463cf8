"""The benchmark suite: `python -m benchmarks --help`.

Nothing here imports jobbert_onnx at import time: the worker module also runs in
the peers' environment, which does not have it.
"""
