"""The closest peer that runs here, over HTTP: sentence-transformers (ONNX int8 encoder, heads in
torch) behind the same framework as ours (Starlette on uvicorn), one `encode` per request, as it is
commonly deployed. Runs in the peers' environment; request and response follow our API.

    python -m benchmarks.peer_server ST_ONNX_FOLDER FILE_NAME PORT
"""

from __future__ import annotations

import sys

import orjson
import uvicorn
from sentence_transformers import SentenceTransformer
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

ALIASES = {"anchor": "anchor", "title": "anchor", "query": "anchor", "positive": "positive", "skills": "positive"}


def main() -> None:
    folder, file_name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = SentenceTransformer(folder, backend="onnx", device="cpu", model_kwargs={"file_name": file_name})
    model.encode(["warm up"], task="anchor")
    model.encode(["warm up"], task="positive")

    async def embeddings(request: Request) -> Response:
        payload = orjson.loads(await request.body())
        texts = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
        task = ALIASES[payload.get("input_type", "anchor")]
        vectors = await run_in_threadpool(model.encode, texts, task=task, batch_size=64)
        data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(vectors)]
        body = {"object": "list", "data": data, "model": "jobbert-v3"}
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    async def ready(request: Request) -> Response:
        return PlainTextResponse("ready\n")

    app = Starlette(routes=[Route("/v1/embeddings", embeddings, methods=["POST"]), Route("/ready", ready)])
    print(f"peer listening on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
