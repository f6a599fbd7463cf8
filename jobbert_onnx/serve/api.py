"""The OpenAI embeddings API: parse and check a request, build the response or the error.

A request is checked completely before any text is encoded; every refusal is an
OpenAI error object whose message says what was wrong and how to fix it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

# `input_type` selects the head; these names are accepted for each.
INPUT_TYPE_ALIASES = {
    "anchor": "anchor",
    "title": "anchor",
    "query": "anchor",
    "positive": "positive",
    "skills": "positive",
    "document": "positive",
}
ENCODING_FORMATS = ("float", "base64")
KNOWN_FIELDS = frozenset({"input", "model", "encoding_format", "input_type", "dimensions", "user"})


class ApiError(Exception):
    """A request the server refuses, as an HTTP status and an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type
        self.headers = headers or {}

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}
        )


@dataclass(frozen=True)
class EmbeddingRequest:
    texts: list[str]
    route: str
    encoding_format: str
    model: str


def parse_request(
    body: bytes,
    *,
    routes: tuple[str, ...],
    default_route: str | None,
    served_model: str,
    dimensions: int,
    max_inputs: int,
    max_chars: int,
) -> EmbeddingRequest:
    """Check a request body; texts longer than `max_chars` are cut (the model reads its first max_seq_length tokens).

    Raises:
        ApiError: 400 for malformed JSON or a wrong field, 404 for a model this server does not serve.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ApiError(400, f"the request body is not valid JSON ({error}); send a JSON object") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"the request body must be a JSON object; got {_kind(payload)}")
    unknown = sorted(set(payload) - KNOWN_FIELDS)
    if unknown:
        raise ApiError(
            400,
            f"unknown field(s) {', '.join(map(repr, unknown))}; this endpoint takes: {', '.join(sorted(KNOWN_FIELDS))}",
            param=unknown[0],
        )

    model = payload.get("model")
    if model is None:
        model = served_model
    if not isinstance(model, str):
        raise ApiError(400, f"'model' must be a string; got {_kind(model)}", param="model")
    if model != served_model:
        raise ApiError(
            404,
            f"the model {model!r} is not served here; this server serves {served_model!r}",
            param="model",
            code="model_not_found",
        )

    texts = _texts(payload.get("input"), max_inputs, max_chars)

    encoding_format = payload.get("encoding_format")
    if encoding_format is None:
        encoding_format = "float"
    if encoding_format not in ENCODING_FORMATS:
        raise ApiError(
            400,
            f"unknown encoding_format {encoding_format!r}; use one of: {', '.join(ENCODING_FORMATS)}",
            param="encoding_format",
        )

    input_type = payload.get("input_type")
    if input_type is not None:
        route = _route(input_type, routes)
    elif default_route is not None:
        route = default_route
    else:
        fix = f"set 'input_type' to one of: {_input_types(routes)}"
        raise ApiError(400, f"this model has no default input_type; {fix}", param="input_type")

    wanted = payload.get("dimensions")
    if wanted is not None and (isinstance(wanted, bool) or wanted != dimensions):
        raise ApiError(
            400,
            f"this model returns {dimensions}-dimensional vectors; 'dimensions' must be {dimensions} or left out",
            param="dimensions",
        )
    user = payload.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, f"'user' must be a string; got {_kind(user)}", param="user")

    return EmbeddingRequest(
        texts=texts,
        route=route,
        encoding_format=encoding_format,
        model=model,
    )


def _texts(value: Any, max_inputs: int, max_chars: int) -> list[str]:
    if value is None:
        raise ApiError(400, "'input' is required: a string or a list of strings", param="input")
    if isinstance(value, str):
        return [value[:max_chars]]
    if not isinstance(value, list):
        raise ApiError(400, f"'input' must be a string or a list of strings; got {_kind(value)}", param="input")
    if not value:
        raise ApiError(400, "'input' is an empty list; send at least one string", param="input")
    if len(value) > max_inputs:
        raise ApiError(
            400,
            f"'input' has {len(value)} items; this server takes at most {max_inputs} per request: split it",
            param="input",
        )
    for index, item in enumerate(value):
        if not isinstance(item, str):
            hint = ""
            if isinstance(item, int) or (isinstance(item, list) and all(isinstance(x, int) for x in item)):
                hint = " (token-id inputs are not supported: send the texts)"
            raise ApiError(400, f"'input[{index}]' is {_kind(item)}, not a string{hint}", param=f"input[{index}]")
    return [text[:max_chars] for text in value]


def _input_types(routes: tuple[str, ...]) -> str:
    return ", ".join(name for name, route in INPUT_TYPE_ALIASES.items() if route in routes)


def _route(input_type: Any, routes: tuple[str, ...]) -> str:
    valid = _input_types(routes)
    if not isinstance(input_type, str):
        raise ApiError(
            400, f"'input_type' must be a string, one of: {valid}; got {_kind(input_type)}", param="input_type"
        )
    route = INPUT_TYPE_ALIASES.get(input_type.lower())
    if route is None or route not in routes:
        raise ApiError(400, f"unknown input_type {input_type!r}; use one of: {valid}", param="input_type")
    return route


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    if type(value) in names:
        return names[type(value)]
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    return type(value).__name__


def response_body(request: EmbeddingRequest, vectors: np.ndarray, tokens: int) -> bytes:
    """The OpenAI embeddings response; base64 is the float32 little-endian bytes of each vector."""
    if request.encoding_format == "base64":
        little = vectors.astype("<f4", copy=False)
        data = [
            {"object": "embedding", "index": index, "embedding": base64.b64encode(row.tobytes()).decode("ascii")}
            for index, row in enumerate(little)
        ]
        return orjson.dumps(_envelope(data, request.model, tokens))
    data = [{"object": "embedding", "index": index, "embedding": row} for index, row in enumerate(vectors)]
    return orjson.dumps(_envelope(data, request.model, tokens), option=orjson.OPT_SERIALIZE_NUMPY)


def _envelope(data: list[dict[str, Any]], model: str, tokens: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
