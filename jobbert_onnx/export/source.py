"""Find a JobBERT-v3 model (hub id or local folder) and read its layout.

The sentence-transformers files are read directly rather than through
sentence-transformers (`st_format` knows every release's names for them), so that
every file the export depends on is checked here and anything that is not the
JobBERT-v3 architecture is refused with an error that says what was found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobbert_onnx.errors import SourceUnavailableError
from jobbert_onnx.export import st_format
from jobbert_onnx.export.st_format import (
    ASYM,
    DENSE,
    NORMALIZE,
    POOLING,
    ROUTER,
    TRANSFORMER,
    UnsupportedModelError,
    read_json,
)
from jobbert_onnx.hub import HUB_ID, hub_unavailable
from jobbert_onnx.manifest import sha256_file, source_configs

ROUTES = ("anchor", "positive")
# Encoders the export traces: transformers' model_type -> its model class. XLM-R (JobBERT-v3's)
# numbers positions from pad_token_id + 1; BERT from 0 and adds token type 0 to every token.
ENCODER_TYPES = {"xlm-roberta": "XLMRobertaModel", "bert": "BertModel"}
# The module lists the exporter reads (kinds as `st_format.MODULE_TYPES` names them).
_LAYOUTS = "Transformer -> Pooling -> Router (or legacy Asym), optionally followed by Normalize"
_MODULE_LISTS = [[TRANSFORMER, POOLING, head, *tail] for head in (ROUTER, ASYM) for tail in ([], [NORMALIZE])]
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


@dataclass(frozen=True)
class HeadSpec:
    """One Dense(hidden -> output) + Tanh head of the asymmetric module, L2-normalized after where
    the model normalizes (a Normalize module in the route or after the Router)."""

    route: str
    folder: Path
    in_features: int
    out_features: int
    weights: Path
    normalize: bool


@dataclass(frozen=True)
class ModelSpec:
    """Everything the exporter needs to know about a source model."""

    source: str
    revision: str | None
    folder: Path
    encoder_folder: Path
    encoder_config: dict[str, Any]
    max_seq_length: int
    router_kind: str
    heads: dict[str, HeadSpec]
    default_route: str | None  # None: every call names its task
    encoder_weights: Path
    # How sentence-transformers' Router sends text whose task is not a route's own name (its
    # route_mappings): task -> route, and the route every task goes to where one is mapped so.
    task_routes: dict[str, str]
    catch_all_route: str | None
    include_prompt: bool
    length_source: str  # where the length cap was read
    module_types: tuple[str, ...]  # modules.json's type names, as written
    saved_by: str | None  # the sentence-transformers release named in the model's files

    @property
    def hidden_size(self) -> int:
        return int(self.encoder_config["hidden_size"])

    @property
    def output_dim(self) -> int:
        return next(iter(self.heads.values())).out_features

    @property
    def normalize(self) -> bool:
        """Whether every head ends in an L2 normalization (the exporter refuses a mix)."""
        return all(head.normalize for head in self.heads.values())

    def weight_files(self) -> list[Path]:
        """The weight files the export reads, encoder first."""
        return [self.encoder_weights, *(h.weights for h in self.heads.values())]

    def weight_hashes(self) -> dict[str, str]:
        """sha256 of every weight file, keyed by its path inside the model folder."""
        return {str(p.relative_to(self.folder)): sha256_file(p) for p in self.weight_files()}

    def config_hashes(self) -> dict[str, str]:
        """sha256 of every configuration file (`manifest.source_configs`), keyed by its path inside the folder."""
        return {str(p.relative_to(self.folder)): sha256_file(p) for p in source_configs(self.folder)}


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
    config = read_json(folder / "config.json", "encoder config")
    found = config.get("model_type") if isinstance(config, dict) else None
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


def _read_heads(routing: st_format.Routing, normalized: bool, hidden: int, allow_pickle: bool) -> dict[str, HeadSpec]:
    """The two heads: each route one Dense, and a Normalize after it if the route has one."""
    routes = sorted(routing.routes)
    if routes != sorted(ROUTES):
        raise UnsupportedModelError(
            f"the {routing.kind} module in {routing.config.parent} has routes {routes}; "
            f"JobBERT-v3 has exactly {list(ROUTES)}"
        )
    heads = {}
    for route in ROUTES:
        modules = routing.routes[route]
        kinds = [kind for kind, _ in modules]
        if kinds not in ([DENSE], [DENSE, NORMALIZE]):
            described = [f"{folder.name} ({kind})" for kind, folder in modules]
            raise UnsupportedModelError(
                f"route {route!r} of the {routing.kind} module ({routing.config}) runs {described}; "
                "expected a single Dense module, optionally followed by Normalize"
            )
        folder = modules[0][1]
        if len(modules) == 2:
            st_format.check_normalize(modules[1][1])
        out_features = st_format.check_dense(route, folder, hidden)
        weights = weights_file(folder, allow_pickle, f"head {route!r}")
        heads[route] = HeadSpec(route, folder, hidden, out_features, weights, normalized or len(modules) == 2)
    if heads["anchor"].out_features != heads["positive"].out_features:
        raise UnsupportedModelError(
            f"the heads give {heads['anchor'].out_features}-d (anchor) and {heads['positive'].out_features}-d "
            "(positive) vectors; both must have the same size to be compared"
        )
    if heads["anchor"].normalize != heads["positive"].normalize:
        raise UnsupportedModelError(
            f"only one route of the {routing.kind} module ({routing.config}) ends in Normalize; the exporter "
            "reads models whose heads both normalize or neither does"
        )
    return heads


def read_model(source: str, revision: str | None = None, allow_pickle: bool = False) -> ModelSpec:
    """Locate a JobBERT-v3 model and check that its layout is the one this exporter supports.

    Supported, as written by sentence-transformers 2.x to 6.x (`st_format`): ``modules.json``
    with Transformer (XLM-R or BERT) -> Pooling (mean) -> Router (``2_Router/router_config.json``)
    or legacy Asym (``2_Asym/config.json``), optionally followed by Normalize, whose routes
    ``anchor`` and ``positive`` each run one Dense(hidden -> d) + Tanh (optionally followed by
    Normalize). Weights are read from safetensors; pickled ``pytorch_model.bin`` files only with
    `allow_pickle`.

    Raises:
        UnsupportedModelError: With what was found, for any other layout.
    """
    folder, resolved = resolve_source(source, revision, allow_pickle)
    modules = st_format.read_modules(folder)
    kinds = [module.kind for module in modules]
    if kinds not in _MODULE_LISTS:
        raise UnsupportedModelError(
            f"{folder / 'modules.json'} lists {' -> '.join(kinds) or 'no modules'} "
            f"({[m.type_name for m in modules]}); the exporter reads {_LAYOUTS}"
        )
    encoder_folder = modules[0].folder
    encoder_config = _check_encoder(encoder_folder)
    encoder_weights = weights_file(encoder_folder, allow_pickle, "encoder")
    hidden = int(encoder_config["hidden_size"])
    st_config, st_config_path = st_format.transformer_config(encoder_folder)
    st_format.check_transformer(st_config, st_config_path)
    cap = st_format.length_cap(encoder_folder, st_config, st_config_path, encoder_config)
    include_prompt = st_format.read_pooling(modules[1].folder, hidden)
    routing = st_format.read_router(modules[2].folder, modules[2].kind)
    normalized = len(modules) == 4
    if normalized:
        st_format.check_normalize(modules[3].folder)
    heads = _read_heads(routing, normalized, hidden, allow_pickle)
    saved_by = st_format.check_prompts(folder)
    if not (encoder_folder / "tokenizer.json").is_file():
        raise UnsupportedModelError(
            f"{encoder_folder / 'tokenizer.json'} is missing (a fast tokenizer file is required)"
        )
    return ModelSpec(
        source=source,
        revision=resolved,
        folder=folder,
        encoder_folder=encoder_folder,
        encoder_config=encoder_config,
        max_seq_length=cap.tokens,
        router_kind=routing.kind,
        heads=heads,
        default_route=routing.default,
        encoder_weights=encoder_weights,
        task_routes=routing.task_routes,
        catch_all_route=routing.catch_all,
        include_prompt=include_prompt,
        length_source=cap.source,
        module_types=tuple(module.type_name for module in modules),
        saved_by=saved_by,
    )
