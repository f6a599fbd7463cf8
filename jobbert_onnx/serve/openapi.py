"""The server's OpenAPI 3.1 description, served at ``GET /openapi.json`` (and fuzzed in the tests)."""

from __future__ import annotations

from typing import Any

from jobbert_onnx.serve.api import ENCODING_FORMATS, INPUT_TYPE_ALIASES


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def openapi(model: str, dimensions: int, max_inputs: int, max_seq_length: int) -> dict[str, Any]:
    embedding_request = {
        "type": "object",
        "required": ["input"],
        "additionalProperties": False,
        "properties": {
            "input": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": max_inputs},
                ],
                "description": f"A text, or a list of texts (each truncated to the model's {max_seq_length} tokens).",
            },
            # optional fields may also be null (clients that serialize None): the default applies
            "model": {"type": ["string", "null"], "enum": [model, None]},
            "encoding_format": {"type": ["string", "null"], "enum": [*ENCODING_FORMATS, None], "default": "float"},
            "input_type": {
                "type": ["string", "null"],
                "enum": [*sorted(INPUT_TYPE_ALIASES), None],
                "description": "The head: anchor (alias title, query) for job titles; "
                "positive (alias skills, document) for skill lists. Default: anchor.",
            },
            "dimensions": {"type": ["integer", "null"], "enum": [dimensions, None]},
            "user": {"type": ["string", "null"]},
        },
    }
    embedding = {
        "type": "object",
        "required": ["object", "index", "embedding"],
        "properties": {
            "object": {"const": "embedding"},
            "index": {"type": "integer"},
            "embedding": {
                "oneOf": [
                    {"type": "array", "items": {"type": "number"}, "minItems": dimensions, "maxItems": dimensions},
                    {"type": "string", "description": "base64 of float32 little-endian"},
                ]
            },
        },
    }
    embedding_response = {
        "type": "object",
        "required": ["object", "data", "model", "usage"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": embedding},
            "model": {"type": "string"},
            "usage": {
                "type": "object",
                "required": ["prompt_tokens", "total_tokens"],
                "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}},
            },
        },
    }
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    }
    plain = {"content": {"text/plain": {"schema": {"type": "string"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "jobbert-onnx", "version": "1", "description": "OpenAI-compatible JobBERT-v3 embeddings."},
        "paths": {
            "/v1/embeddings": {
                "post": {
                    "operationId": "createEmbedding",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingRequest"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "One vector per input, in input order.",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingResponse"}}
                            },
                        },
                        "400": _error("Malformed JSON or a wrong field."),
                        "401": _error("Missing or wrong API key."),
                        "404": _error("A model this server does not serve."),
                        "408": _error("The request body arrived too slowly."),
                        "413": _error("The request body is too large."),
                        "503": _error("Queue full or model still loading; retry after Retry-After seconds."),
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "operationId": "listModels",
                    "responses": {"200": {"description": "The served model."}, "401": _error("API key.")},
                }
            },
            "/health": {"get": {"operationId": "health", "responses": {"200": {"description": "Up.", **plain}}}},
            "/ready": {
                "get": {
                    "operationId": "ready",
                    "responses": {
                        "200": {"description": "Loaded and warmed.", **plain},
                        "503": {"description": "Still warming up.", **plain},
                    },
                }
            },
            "/metrics": {
                "get": {"operationId": "metrics", "responses": {"200": {"description": "Prometheus.", **plain}}}
            },
        },
        "components": {
            "schemas": {
                "EmbeddingRequest": embedding_request,
                "EmbeddingResponse": embedding_response,
                "Error": error,
            }
        },
    }
