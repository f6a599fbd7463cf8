"""sentence-transformers' save formats, every generation, read as that library reads them.

Every release from 2.x on writes the same shape (``modules.json``, then one folder per
module), but not the same names inside it. What changed, and where this module reads it:

- Module type names (`MODULE_TYPES`): ``sentence_transformers.models.X`` up to 5.3, where a
  Router (5.0-5.3) writes the modules it holds as ``...models.Dense.Dense``; from 5.4 the class's
  own module path, ``sentence_transformers.base.modules.router.Router``,
  ``sentence_transformers.sentence_transformer.modules.pooling.Pooling``; Normalize moved again in
  6.0 (``...sentence_transformer.modules.normalize`` -> ``...base.modules.normalize``).
- The asymmetric module: Asym (2.x-4.x, ``config.json``: types, structure, ``allow_empty_key``),
  then Router (5.0 on, ``router_config.json`` with ``default_route`` and ``route_mappings``);
  5.x and 6.x load an Asym folder as a Router (`read_router`).
- The length cap (`length_cap`): ``max_seq_length`` in ``sentence_bert_config.json`` up to 5.3;
  from 5.4 the tokenizer's ``model_max_length`` in ``tokenizer_config.json``.
- The transformer's config (`check_transformer`): ``max_seq_length``/``do_lower_case`` up to 5.3;
  ``transformer_task``, ``modality_config``, ``module_output_name`` from 5.4.
- Pooling (`read_pooling`): one ``pooling_mode_*`` flag per mode and ``word_embedding_dimension``
  up to 5.3; ``pooling_mode`` and ``embedding_dimension`` from 5.4.
- Dense (`check_dense`): from 5.4 also ``module_input_name``/``module_output_name``, from 6.0
  ``use_residual`` (written only when true).

Where a file could mean two things to two releases, the model is refused with both named
rather than exported as one of them.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobbert_onnx.errors import JobbertOnnxError

TRANSFORMER, POOLING, ROUTER, ASYM, DENSE, NORMALIZE = "Transformer", "Pooling", "Router", "Asym", "Dense", "Normalize"

# Every type name a sentence-transformers release writes for the modules a JobBERT-v3-shaped
# model can hold, and the releases that write it (in modules.json, or in a Router's or Asym's types).
MODULE_TYPES: dict[str, str] = {
    "sentence_transformers.models.Transformer": TRANSFORMER,  # 2.x-5.3
    "sentence_transformers.models.Transformer.Transformer": TRANSFORMER,  # 5.0-5.3, inside a Router
    "sentence_transformers.base.modules.transformer.Transformer": TRANSFORMER,  # 5.4-
    "sentence_transformers.models.Pooling": POOLING,  # 2.x-5.3
    "sentence_transformers.models.Pooling.Pooling": POOLING,  # 5.0-5.3, inside a Router
    "sentence_transformers.sentence_transformer.modules.pooling.Pooling": POOLING,  # 5.4-
    "sentence_transformers.models.Asym": ASYM,  # 2.x-4.x
    "sentence_transformers.models.Router": ROUTER,  # 5.0-5.3
    "sentence_transformers.base.modules.router.Router": ROUTER,  # 5.4-
    "sentence_transformers.models.Dense": DENSE,  # 2.x-5.3, and in an Asym's types
    "sentence_transformers.models.Dense.Dense": DENSE,  # 5.0-5.3, inside a Router
    "sentence_transformers.base.modules.dense.Dense": DENSE,  # 5.4-
    "sentence_transformers.models.Normalize": NORMALIZE,  # 2.x-5.3
    "sentence_transformers.models.Normalize.Normalize": NORMALIZE,  # 5.0-5.3, inside a Router
    "sentence_transformers.sentence_transformer.modules.normalize.Normalize": NORMALIZE,  # 5.4-5.7
    "sentence_transformers.base.modules.normalize.Normalize": NORMALIZE,  # 6.0-
}
# Names under which releases have kept the transformer's own config, in the order 5.x and 6.x try them.
TRANSFORMER_CONFIGS = (
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)
ROUTER_CONFIG = "router_config.json"
LEGACY_CONFIG = "config.json"  # an Asym's, and a Router's before router_config.json
TANH = ("torch.nn.modules.activation.Tanh", "torch.nn.Tanh")
# The transformer's numerics as a sentence encoder: token embeddings from the forward pass.
_TRANSFORMER_DEFAULTS: dict[str, Any] = {
    "transformer_task": "feature-extraction",
    "module_output_name": "token_embeddings",
    "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
}
_MULTI_VECTOR_KEYS = ("query_length", "document_length", "query_expansion")
_SENTENCE_EMBEDDING = "sentence_embedding"


class UnsupportedModelError(JobbertOnnxError, ValueError):
    """The source is not a JobBERT-v3-shaped sentence-transformers model."""


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UnsupportedModelError(f"{what}: {path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UnsupportedModelError(f"{what}: {path} is not valid JSON ({error})") from error


def module_kind(type_name: object, where: Path) -> str:
    """The kind of module a type name stands for (`MODULE_TYPES`); an unknown name is refused with the
    names this exporter reads."""
    kind = MODULE_TYPES.get(str(type_name))
    if kind is None:
        known = sorted({*MODULE_TYPES.values()})
        raise UnsupportedModelError(
            f"{where} names a module of type {type_name!r}, which no sentence-transformers release writes for "
            f"JobBERT-v3's modules; the exporter reads {', '.join(known)} under the type names of "
            "sentence-transformers 2.x to 6.x"
        )
    return kind


@dataclass(frozen=True)
class Module:
    """One entry of modules.json: its kind, the type name as written, and its folder."""

    kind: str
    type_name: str
    folder: Path


def read_modules(folder: Path) -> list[Module]:
    """modules.json, every entry's type name resolved to a kind (``unknown`` where `MODULE_TYPES` lacks
    it: the caller names the whole list)."""
    path = folder / "modules.json"
    entries = read_json(path, "sentence-transformers module list")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UnsupportedModelError(f"{path} is not a list of modules")
    names = [str(entry.get("type")) for entry in entries]
    return [
        Module(MODULE_TYPES.get(name, "unknown"), name, folder / str(entry.get("path", "")))
        for name, entry in zip(names, entries, strict=True)
    ]


def transformer_config(folder: Path) -> tuple[dict[str, Any], Path | None]:
    """The transformer module's own config and its file (None where a release wrote none)."""
    for name in TRANSFORMER_CONFIGS:
        path = folder / name
        if path.is_file():
            config = read_json(path, "sentence-transformers config")
            if not isinstance(config, dict):
                raise UnsupportedModelError(f"{path} is not a JSON object")
            return config, path
    return {}, None


def check_transformer(config: dict[str, Any], path: Path | None) -> None:
    """Refuse a transformer module that is not a plain sentence encoder (every release's keys)."""
    where = path or "the transformer's config"
    for key, expected in _TRANSFORMER_DEFAULTS.items():
        if config.get(key, expected) != expected:
            raise UnsupportedModelError(
                f"{where} sets {key}={config[key]!r}; the exporter reads sentence encoders only ({key}={expected!r})"
            )
    for key in _MULTI_VECTOR_KEYS:
        if config.get(key) is not None:
            raise UnsupportedModelError(f"{where} sets {key}={config[key]!r}: a multi-vector model, not supported")
    if config.get("processing_kwargs"):
        raise UnsupportedModelError(
            f"{where} sets processing_kwargs={config['processing_kwargs']!r}, which change how texts are tokenized; "
            "the exporter reads models tokenized with their tokenizer's own settings: remove them"
        )
    if config.get("do_lower_case"):
        raise UnsupportedModelError(f"{where} sets do_lower_case=true; JobBERT-v3 does not lowercase")
    # Arguments sentence-transformers passes when it loads the tokenizer and the config (old names and
    # new): they would change the tokenizer or the encoder the exporter loads without them.
    for key in ("tokenizer_args", "processor_kwargs", "config_args", "config_kwargs"):
        given = config.get(key) or {}
        other = sorted(set(given) - ({"model_max_length"} if key in ("tokenizer_args", "processor_kwargs") else set()))
        if other:
            raise UnsupportedModelError(
                f"{where} passes {key} {other} when it loads the model; the exporter loads the tokenizer and encoder "
                "from their own files only: save the model with those settings applied instead"
            )


@dataclass(frozen=True)
class LengthCap:
    """The model's input cap in tokens, and where it was read."""

    tokens: int
    source: str


def length_cap(encoder: Path, config: dict[str, Any], path: Path | None, encoder_config: dict[str, Any]) -> LengthCap:
    """The length cap every sentence-transformers release applies to this folder.

    Up to 5.3 the cap is ``max_seq_length`` in the transformer's config, else the smaller of the
    tokenizer's ``model_max_length`` and the config's ``max_position_embeddings``. From 5.4 a
    ``model_max_length`` among the tokenizer arguments the config stores wins over
    ``max_seq_length``, which wins over ``tokenizer_config.json``. Releases disagree only where the
    config holds both ``max_seq_length`` and such a tokenizer argument, with different values: that
    is refused, naming both.

    Args:
        encoder: The transformer's folder.
        config: Its sentence-transformers config (`transformer_config`).
        path: That config's file.
        encoder_config: The encoder's transformers config (``config.json``).
    """
    positions = max_positions(encoder_config)
    where = path.name if path else "sentence_bert_config.json"
    stated = config.get("max_seq_length")
    arguments = {**(config.get("tokenizer_args") or {}), **(config.get("processor_kwargs") or {})}
    argued = arguments.get("model_max_length")
    if stated is not None and argued is not None and stated != argued:
        raise UnsupportedModelError(
            f"{path} sets max_seq_length={stated!r} and, among its tokenizer arguments, model_max_length={argued!r}: "
            "sentence-transformers up to 5.3 truncates at the first, 5.4 and later at the second; make them agree"
        )
    if argued is not None:
        cap, source = argued, f"{where} (tokenizer argument model_max_length)"
    elif stated is not None:
        cap, source = stated, f"{where} (max_seq_length)"
    else:
        tokenizer = read_json(encoder / "tokenizer_config.json", "tokenizer config")
        written = tokenizer.get("model_max_length") if isinstance(tokenizer, dict) else None
        table = int(encoder_config["max_position_embeddings"])
        if not isinstance(written, int):
            raise UnsupportedModelError(
                f"{encoder / 'tokenizer_config.json'} sets no integer model_max_length and {where} no "
                "max_seq_length, so the model has no length cap: set model.max_seq_length (64 for JobBERT-v3) "
                "in sentence-transformers and save the model again"
            )
        cap = min(written, table)
        source = "tokenizer_config.json (model_max_length)"
    if not isinstance(cap, int) or isinstance(cap, bool) or not 2 <= cap <= positions:
        raise UnsupportedModelError(f"the length cap {cap!r} in {source} is not in [2, {positions}]")
    return LengthCap(cap, source)


def max_positions(config: dict[str, Any]) -> int:
    """The longest input the encoder's position table covers.

    XLM-R gives the first real token position ``pad_token_id + 1`` (the positions below it
    are reserved for padding), so it covers ``max_position_embeddings - pad_token_id - 1``;
    BERT counts from 0.
    """
    table = int(config["max_position_embeddings"])
    return table - int(config["pad_token_id"]) - 1 if config["model_type"] == "xlm-roberta" else table


def read_pooling(folder: Path, hidden: int) -> bool:
    """Check mean pooling over `hidden` dimensions (flags up to 5.3, ``pooling_mode`` from 5.4);
    returns ``include_prompt``."""
    path = folder / "config.json"
    config = read_json(path, "pooling config")
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{path} is not a JSON object")
    if "pooling_mode" in config:  # 5.4 and later: one name, or a list of names
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode) if isinstance(mode, list) else [repr(mode)]
        found = f"pooling_mode={mode!r}"
    else:
        modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v is True)
        modes = ["mean" if m == "pooling_mode_mean_tokens" else m for m in modes]
        found = f"{modes or 'no mode'}"
    if modes != ["mean"]:
        raise UnsupportedModelError(f"pooling in {folder} uses {found}; only mean pooling is supported")
    dim = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    if dim != hidden:
        raise UnsupportedModelError(
            f"pooling in {folder} expects dimension {dim}, the encoder has hidden size {hidden}"
        )
    include = config.get("include_prompt", True)
    if not isinstance(include, bool):
        raise UnsupportedModelError(f"{path} sets include_prompt={include!r}; expected true or false")
    return include


def check_dense(task: str, folder: Path, hidden: int) -> int:
    """Check one Dense(hidden -> d) + Tanh head, every release's keys; returns d."""
    config = read_json(folder / "config.json", f"Dense config of head {task!r}")
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{folder / 'config.json'} is not a JSON object")
    found = (
        f"in_features={config.get('in_features')}, out_features={config.get('out_features')}, "
        f"bias={config.get('bias')}, activation={config.get('activation_function')}"
    )
    if (
        config.get("in_features") != hidden
        or not isinstance(config.get("out_features"), int)
        or config.get("bias") is not True
        or config.get("activation_function") not in TANH
    ):
        raise UnsupportedModelError(
            f"head {task!r} ({folder}) is Dense({found}); expected Dense(in_features={hidden}, bias=True) with Tanh"
        )
    if config.get("use_residual"):
        raise UnsupportedModelError(f"head {task!r} ({folder}) adds its input back (use_residual); not supported")
    _check_reads_sentence_embedding(config, folder / "config.json", f"head {task!r}")
    return int(config["out_features"])


def check_normalize(folder: Path) -> None:
    """A Normalize module: L2 over the sentence embedding (no config before 5.4; its keys from 5.4)."""
    path = folder / "config.json"
    config = read_json(path, "Normalize config") if path.is_file() else {}
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{path} is not a JSON object")
    _check_reads_sentence_embedding(config, path, "Normalize")


def _check_reads_sentence_embedding(config: dict[str, Any], path: Path, what: str) -> None:
    source = config.get("module_input_name", _SENTENCE_EMBEDDING)
    target = config.get("module_output_name") or source
    if source != _SENTENCE_EMBEDDING or target != _SENTENCE_EMBEDDING:
        raise UnsupportedModelError(
            f"{what} ({path}) reads {source!r} and writes {target!r}; the exporter reads modules that map "
            f"{_SENTENCE_EMBEDDING!r} to itself"
        )


@dataclass(frozen=True)
class Routing:
    """The asymmetric module as sentence-transformers >= 5 routes text through it.

    `routes` maps each route to its modules (kind, folder) in order. A text with task ``t`` goes
    to ``task_routes[t]``, else `catch_all`, else the route named ``t``; with no task, to
    `catch_all`, else `default` (None: a task must be given).
    """

    kind: str
    config: Path
    routes: dict[str, list[tuple[str, Path]]]
    default: str | None
    task_routes: dict[str, str]
    catch_all: str | None


def read_router(folder: Path, kind: str) -> Routing:
    """A Router (5.0 on: ``router_config.json``, or ``config.json`` as 5.x and 6.x fall back to) or a
    legacy Asym (2.x-4.x: ``config.json``), with its routing parameters."""
    path = folder / ROUTER_CONFIG
    if kind == ASYM or not path.is_file():
        path = folder / LEGACY_CONFIG
    config = read_json(path, f"{kind} config")
    structure = config.get("structure") if isinstance(config, dict) else None
    if not isinstance(structure, dict) or not all(isinstance(v, list) for v in structure.values()):
        raise UnsupportedModelError(f"{path} has no 'structure' mapping routes to lists of modules")
    types = config.get("types") or {}
    routes = {
        str(route): [(module_kind(types.get(name), path), folder / str(name)) for name in names]
        for route, names in structure.items()
    }
    parameters = config.get("parameters") or {}
    # A Router with no default route takes its first route when empty keys are allowed (5.x, 6.x).
    default = parameters.get("default_route")
    if default is None and parameters.get("allow_empty_key", True) and routes:
        default = next(iter(routes))
    if default is not None and default not in routes:
        raise UnsupportedModelError(f"default route {default!r} in {path} is not one of {sorted(routes)}")
    task_routes, catch_all = _text_mappings(parameters.get("route_mappings") or {}, path, routes)
    return Routing(kind, path, routes, default, task_routes, catch_all)


def _text_mappings(mappings: dict[str, Any], path: Path, routes: dict[str, Any]) -> tuple[dict[str, str], str | None]:
    """A Router's ``route_mappings`` ("(task, modality)" -> route) as they apply to text: per task,
    (task, "text") before (task, None); the catch-all, (None, "text") before (None, None)."""
    parsed: dict[tuple[Any, Any], str] = {}
    for key, route in mappings.items():
        try:
            task, modality = ast.literal_eval(key)
        except (ValueError, SyntaxError, TypeError):
            raise UnsupportedModelError(
                f"{path}: route_mappings key {key!r} is not a (task, modality) pair; fix or remove it"
            ) from None
        if route not in routes:
            raise UnsupportedModelError(f"{path}: route_mappings sends {key} to {route!r}, not one of {sorted(routes)}")
        parsed[(task, modality)] = route
    tasks = {task for task, _ in parsed if task is not None}
    task_routes = {
        str(task): parsed.get((task, "text"), parsed.get((task, None)))
        for task in sorted(tasks)
        if (task, "text") in parsed or (task, None) in parsed
    }
    catch_all = parsed.get((None, "text"), parsed.get((None, None)))
    return {task: route for task, route in task_routes.items() if route is not None}, catch_all


def check_prompts(folder: Path) -> str | None:
    """The release that wrote the model (``config_sentence_transformers.json``), after checking that no
    default prompt would be put in front of every text."""
    path = folder / "config_sentence_transformers.json"
    if not path.is_file():
        return None
    config = read_json(path, "sentence-transformers model config")
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{path} is not a JSON object")
    model_type = config.get("model_type", "SentenceTransformer")
    if model_type != "SentenceTransformer":
        raise UnsupportedModelError(f"{path} describes a {model_type}; the exporter reads SentenceTransformer models")
    name = config.get("default_prompt_name")
    prompt = (config.get("prompts") or {}).get(name) if name is not None else None
    if prompt:
        raise UnsupportedModelError(
            f"{path} puts the default prompt {name!r} ({prompt!r}) in front of every text; jobbert-onnx applies "
            "no default prompt: set default_prompt_name to null and pass the prompt to encode(prompt=...)"
        )
    version = (config.get("__version__") or {}).get("sentence_transformers")
    return str(version) if version else None
