"""Find a JobBERT-v3 model (hub id or local folder) and read its layout.

The sentence-transformers configuration files are read directly rather than
through sentence-transformers, so that every file the export depends on is
checked here and anything that is not the JobBERT-v3 architecture is refused
with an error that says what was found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobbert_onnx.errors import JobbertOnnxError, SourceUnavailableError
from jobbert_onnx.hub import HUB_ID, hub_unavailable
from jobbert_onnx.manifest import sha256_file

ROUTES = ("anchor", "positive")
# Encoders the export traces: transformers' model_type -> its model class. XLM-R (JobBERT-v3's)
# numbers positions from pad_token_id + 1; BERT from 0 and adds token type 0 to every token.
ENCODER_TYPES = {"xlm-roberta": "XLMRobertaModel", "bert": "BertModel"}
TANH = "torch.nn.modules.activation.Tanh"
_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_ROUTER_TYPES = {
    "sentence_transformers.models.Router": ("router_config.json", "Router"),
    "sentence_transformers.models.Asym": ("config.json", "Asym"),
}
# Hub files the export reads (patterns match in subfolders too); pickled weights
# (unless allowed) and ONNX/OpenVINO copies in the repository are left undownloaded.
_HUB_PATTERNS = ["*.json", "*.safetensors"]
SAFETENSORS = "model.safetensors"
PICKLE = "pytorch_model.bin"
_PICKLE_FIX = (
    "convert the weights to safetensors, or pass --allow-pickle (allow_pickle=True) if you trust the files: "
    "loading pickle can run code hidden in them"
)


def weights_file(folder: Path, allow_pickle: bool, what: str) -> Path:
    """The weights of one module: model.safetensors, or pytorch_model.bin only if pickle is allowed.

    Raises:
        UnsupportedModelError: No safetensors file, and pickle is not allowed (or absent too).
    """
    safe = folder / SAFETENSORS
    if safe.is_file():
        return safe
    pickled = folder / PICKLE
    if pickled.is_file():
        if allow_pickle:
            return pickled
        raise UnsupportedModelError(f"{what}: {safe} is missing and only {PICKLE} (pickle) is there; {_PICKLE_FIX}")
    raise UnsupportedModelError(f"{what}: {safe} is missing")


def load_state(path: Path) -> dict[str, Any]:
    """Tensors of one weights file as numpy arrays; pickle (only reached when allowed) via
    torch's restricted ``weights_only`` unpickler."""
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return {name: tensor.float().numpy() for name, tensor in state.items()}


class UnsupportedModelError(JobbertOnnxError, ValueError):
    """The source is not a JobBERT-v3-shaped sentence-transformers model."""


@dataclass(frozen=True)
class HeadSpec:
    """One Dense(hidden -> output) + Tanh head of the asymmetric module."""

    route: str
    folder: Path
    in_features: int
    out_features: int
    weights: Path


@dataclass(frozen=True)
class ModelSpec:
    """Everything the exporter needs to know about a source model."""

    source: str
    revision: str | None
    folder: Path
    encoder_config: dict[str, Any]
    max_seq_length: int
    router_kind: str
    heads: dict[str, HeadSpec]
    default_route: str
    encoder_weights: Path

    @property
    def hidden_size(self) -> int:
        return int(self.encoder_config["hidden_size"])

    @property
    def output_dim(self) -> int:
        return self.heads[self.default_route].out_features

    def weight_files(self) -> list[Path]:
        """The weight files the export reads, encoder first."""
        return [self.encoder_weights, *(h.weights for h in self.heads.values())]

    def weight_hashes(self) -> dict[str, str]:
        """sha256 of every weight file, keyed by its path inside the model folder."""
        return {str(p.relative_to(self.folder)): sha256_file(p) for p in self.weight_files()}


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UnsupportedModelError(f"{what}: {path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UnsupportedModelError(f"{what}: {path} is not valid JSON ({error})") from error


def resolve_source(source: str, revision: str | None = None, allow_pickle: bool = False) -> tuple[Path, str | None]:
    """Return a local folder for a hub id or a local path, and the resolved revision.

    Args:
        source: A local sentence-transformers folder, or a hub id such as
            ``TechWolf/JobBERT-v3``.
        revision: A branch, tag or commit of the hub repository.
        allow_pickle: Also download pickled weights (``*.bin``).

    Raises:
        UnsupportedModelError: The source is neither an existing folder nor a hub id.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UnsupportedModelError(f"{source} is a file; pass the model folder that holds modules.json")
        if revision is not None:
            raise UnsupportedModelError(f"--revision applies to hub ids only; {source} is a local folder")
        return path.resolve(), None
    if not HUB_ID.match(source):
        raise UnsupportedModelError(
            f"{source!r} is neither an existing folder nor a hub id of the form owner/name (e.g. TechWolf/JobBERT-v3)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    patterns = [*_HUB_PATTERNS, "*.bin"] if allow_pickle else _HUB_PATTERNS
    try:
        folder = Path(snapshot_download(repo_id=source, revision=revision, allow_patterns=patterns))
    except (RevisionNotFoundError, RepositoryNotFoundError) as error:
        raise hub_unavailable(source, revision, error) from None
    except LocalEntryNotFoundError:
        raise SourceUnavailableError(
            f"{source} is not in the local hub cache and the hub cannot be reached (HF_HUB_OFFLINE is set, or "
            "there is no network): run once with network access, or pass a local folder"
        ) from None
    # Snapshot folders are named after the commit they hold.
    return folder, folder.name


def _check_encoder(folder: Path) -> dict[str, Any]:
    config = _read_json(folder / "config.json", "encoder config")
    found = config.get("model_type")
    if found not in ENCODER_TYPES:
        raise UnsupportedModelError(
            f"the encoder is model_type {found!r} ({folder / 'config.json'}); "
            f"the export supports {', '.join(repr(t) for t in ENCODER_TYPES)}"
        )
    if not isinstance(config.get("pad_token_id"), int):
        raise UnsupportedModelError(f"{folder / 'config.json'} sets no integer pad_token_id")
    for key, expected in (("position_embedding_type", "absolute"), ("hidden_act", "gelu")):
        if config.get(key, expected) != expected:
            raise UnsupportedModelError(f"the encoder has {key}={config.get(key)!r}; only {expected!r} is supported")
    return dict(config)


def max_positions(config: dict[str, Any]) -> int:
    """The longest input the encoder's position table covers.

    XLM-R gives the first real token position ``pad_token_id + 1`` (the positions below it
    are reserved for padding), so it covers ``max_position_embeddings - pad_token_id - 1``;
    BERT counts from 0.
    """
    table = int(config["max_position_embeddings"])
    return table - int(config["pad_token_id"]) - 1 if config["model_type"] == "xlm-roberta" else table


def _check_pooling(folder: Path, hidden: int) -> None:
    config = _read_json(folder / "config.json", "pooling config")
    modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v is True)
    if modes != ["pooling_mode_mean_tokens"]:
        raise UnsupportedModelError(
            f"pooling in {folder} uses {modes or 'no mode'}; only mean pooling (pooling_mode_mean_tokens) is supported"
        )
    dim = config.get("word_embedding_dimension")
    if dim != hidden:
        raise UnsupportedModelError(
            f"pooling in {folder} expects dimension {dim}, the encoder has hidden size {hidden}"
        )


def _check_dense(route: str, folder: Path, hidden: int, allow_pickle: bool) -> HeadSpec:
    config = _read_json(folder / "config.json", f"Dense config of head {route!r}")
    found = (
        f"in_features={config.get('in_features')}, out_features={config.get('out_features')}, "
        f"bias={config.get('bias')}, activation={config.get('activation_function')}"
    )
    if (
        config.get("in_features") != hidden
        or not isinstance(config.get("out_features"), int)
        or config.get("bias") is not True
        or config.get("activation_function") != TANH
    ):
        raise UnsupportedModelError(
            f"head {route!r} ({folder}) is Dense({found}); expected Dense(in_features={hidden}, bias=True) with Tanh"
        )
    weights = weights_file(folder, allow_pickle, f"head {route!r}")
    return HeadSpec(
        route=route, folder=folder, in_features=hidden, out_features=int(config["out_features"]), weights=weights
    )


def _read_heads(folder: Path, module_type: str, hidden: int, allow_pickle: bool) -> tuple[dict[str, HeadSpec], str]:
    config_name, kind = _ROUTER_TYPES[module_type]
    config = _read_json(folder / config_name, f"{kind} config")
    structure = config.get("structure")
    types = config.get("types", {})
    if not isinstance(structure, dict):
        raise UnsupportedModelError(f"{folder / config_name} has no 'structure' mapping routes to modules")
    routes = sorted(structure)
    if routes != sorted(ROUTES):
        raise UnsupportedModelError(
            f"the {kind} module in {folder} has routes {routes}; JobBERT-v3 has exactly {list(ROUTES)}"
        )
    heads = {}
    for route in ROUTES:
        modules = structure[route]
        if len(modules) != 1 or not str(types.get(modules[0], "")).startswith("sentence_transformers.models.Dense"):
            described = [f"{m} ({types.get(m, 'unknown type')})" for m in modules]
            raise UnsupportedModelError(
                f"route {route!r} of the {kind} module runs {described}; expected a single Dense module"
            )
        heads[route] = _check_dense(route, folder / modules[0], hidden, allow_pickle)
    if heads["anchor"].out_features != heads["positive"].out_features:
        raise UnsupportedModelError(
            f"the heads give {heads['anchor'].out_features}-d (anchor) and {heads['positive'].out_features}-d "
            "(positive) vectors; both must have the same size to be compared"
        )
    # sentence-transformers >= 5 uses the Router's default route; the legacy Asym
    # has none, and JobBERT-v3's documented default is the title side.
    default = config.get("parameters", {}).get("default_route") or "anchor"
    if default not in heads:
        raise UnsupportedModelError(f"default route {default!r} in {folder / config_name} is not one of {routes}")
    return heads, default


def read_model(source: str, revision: str | None = None, allow_pickle: bool = False) -> ModelSpec:
    """Locate a JobBERT-v3 model and check that its layout is the one this exporter supports.

    Supported: ``modules.json`` with Transformer (XLM-R or BERT) -> Pooling (mean) -> Router
    (``2_Router/router_config.json``) or legacy Asym (``2_Asym/config.json``), whose
    routes ``anchor`` and ``positive`` each run one Dense(hidden -> d) + Tanh. Weights
    are read from safetensors; pickled ``pytorch_model.bin`` files only with `allow_pickle`.

    Raises:
        UnsupportedModelError: With what was found, for any other layout.
    """
    folder, resolved = resolve_source(source, revision, allow_pickle)
    modules = _read_json(folder / "modules.json", "sentence-transformers module list")
    if not isinstance(modules, list):
        raise UnsupportedModelError(f"{folder / 'modules.json'} is not a list of modules")
    found = [str(m.get("type")) for m in modules]
    if len(modules) != 3 or found[0] != _TRANSFORMER or found[1] != _POOLING or found[2] not in _ROUTER_TYPES:
        raise UnsupportedModelError(
            f"{folder / 'modules.json'} lists {found}; expected Transformer -> Pooling -> Router (or legacy Asym)"
        )
    encoder_folder = folder / modules[0].get("path", "")
    encoder_config = _check_encoder(encoder_folder)
    encoder_weights = weights_file(encoder_folder, allow_pickle, "encoder")
    hidden = int(encoder_config["hidden_size"])
    st_config = _read_json(encoder_folder / "sentence_bert_config.json", "sentence-transformers config")
    max_seq_length = st_config.get("max_seq_length")
    limit = max_positions(encoder_config)
    if not isinstance(max_seq_length, int) or not 2 <= max_seq_length <= limit:
        raise UnsupportedModelError(
            f"max_seq_length {max_seq_length!r} in sentence_bert_config.json is not in [2, {limit}]"
        )
    if st_config.get("do_lower_case"):
        raise UnsupportedModelError("sentence_bert_config.json sets do_lower_case=true; JobBERT-v3 does not lowercase")
    _check_pooling(folder / modules[1]["path"], hidden)
    heads, default = _read_heads(folder / modules[2]["path"], found[2], hidden, allow_pickle)
    if not (encoder_folder / "tokenizer.json").is_file():
        raise UnsupportedModelError(
            f"{encoder_folder / 'tokenizer.json'} is missing (a fast tokenizer file is required)"
        )
    return ModelSpec(
        source=source,
        revision=resolved,
        folder=folder,
        encoder_config=encoder_config,
        max_seq_length=max_seq_length,
        router_kind=_ROUTER_TYPES[found[2]][1],
        heads=heads,
        default_route=default,
        encoder_weights=encoder_weights,
    )
