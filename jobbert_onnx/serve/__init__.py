"""`jobbert-onnx serve`: an OpenAI-compatible embedding server with dynamic batching.

The request path, file by file: `api` (parse and check a request) -> `queue`
(tokenize, merge concurrent requests into device batches, split the vectors
back) -> the runtime's `Encoder` -> `api` (the response). `app` wires them into
an ASGI application with health, readiness and metrics; `workers` runs one or
several server processes.
"""

from jobbert_onnx.serve.config import ServeConfig

__all__ = ["ServeConfig"]
