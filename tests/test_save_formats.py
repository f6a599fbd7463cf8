"""Models as sentence-transformers saves them, every generation: read, exported and matched.

The hand-written layouts of `random_model` are sentence-transformers 4.1's and 5.1's; here the
installed sentence-transformers loads and saves them itself (5.4 and later: new module type
paths, the length cap in the tokenizer's config, compact pooling), fine-tunes one, appends
Normalize, maps tasks, and the exports are compared with that library's own vectors.
`scripts/check-save-formats.sh` does the same with releases this project does not pin.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_close, parity_texts

from jobbert_onnx import Encoder, samples
from jobbert_onnx.errors import UsageError
from jobbert_onnx.export import UnsupportedModelError, export_model
from jobbert_onnx.export.source import read_model
from jobbert_onnx.export.st_format import MODULE_TYPES
from jobbert_onnx.manifest import route_for
from jobbert_onnx.vectors import row_cosines

FP32_ATOL = 1e-5
FP32_MIN_COSINE = 0.99999
TASKS = ("anchor", "positive")


def _quiet(_: str) -> None:
    pass


def _copy(source: Path, tmp_path: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(source, tmp_path / name))


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _edit(path: Path, **changes: Any) -> None:
    data = _read(path)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    _write(path, data)


def _st(folder: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


def _st_saved(source: Path, target: Path, change: Callable[[Any], Any] | None = None) -> Path:
    """`source` loaded and saved again by the installed sentence-transformers (after `change`)."""
    model = _st(source)
    if change is not None:
        model = change(model) or model
    model.save(str(target))
    return target


def _export(model: Path, out: Path) -> Encoder:
    export_model(str(model), out, precision="fp32", validate_device="cpu", log=_quiet)
    return Encoder.load(out, device="cpu", precision="fp32")


def _assert_matches_st(encoder: Encoder, st_model: Any, what: str, tasks: tuple[str | None, ...] = TASKS) -> None:
    texts = parity_texts()
    for task in tasks:
        expected = st_model.encode(texts, task=task, batch_size=8)
        got = encoder.encode(texts, task=task, batch_size=8)
        assert_close(got, expected, FP32_ATOL, f"{what}/{task}")
        assert row_cosines(got, expected).min() >= FP32_MIN_COSINE, f"{what}/{task}"


@pytest.fixture(scope="module")
def st_saved_router(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _st_saved(tiny_models["router"], tmp_path_factory.mktemp("st-saved") / "router")


# ---- what the installed sentence-transformers writes, read and exported ----


def test_the_installed_release_writes_the_new_format(st_saved_router: Path) -> None:
    """Guards the tests below: if a release wrote the old format again, they would prove nothing new."""
    types = [module["type"] for module in _read(st_saved_router / "modules.json")]
    assert types == [
        "sentence_transformers.base.modules.transformer.Transformer",
        "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
        "sentence_transformers.base.modules.router.Router",
    ]
    assert "max_seq_length" not in _read(st_saved_router / "sentence_bert_config.json")
    assert _read(st_saved_router / "tokenizer_config.json")["model_max_length"] == 64
    assert set(_read(st_saved_router / "1_Pooling" / "config.json")) == {
        "embedding_dimension",
        "pooling_mode",
        "include_prompt",
    }
    router = _read(st_saved_router / "2_Router" / "router_config.json")
    assert set(router["types"].values()) == {"sentence_transformers.base.modules.dense.Dense"}
    assert set(router["parameters"]) == {"default_route", "allow_empty_key", "route_mappings"}


def test_a_model_saved_by_the_installed_release_exports_and_matches_it(st_saved_router: Path, tmp_path: Path) -> None:
    encoder = _export(st_saved_router, tmp_path / "export")
    manifest = encoder.manifest.raw
    assert manifest["architecture"]["max_seq_length"] == 64
    assert manifest["source"]["max_seq_length_from"] == "tokenizer_config.json (model_max_length)"
    assert manifest["source"]["saved_by"] and not manifest["source"]["saved_by"].startswith(("4.", "5.1"))
    _assert_matches_st(encoder, _st(st_saved_router), "saved by the installed release", (*TASKS, None))


@pytest.mark.slow
def test_the_legacy_asym_layout_saved_by_the_installed_release(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """sentence-transformers 5 and later load a 2_Asym folder as a Router and save it as one."""
    saved = _st_saved(tiny_models["legacy-asym"], tmp_path / "saved")
    assert (saved / "2_Router" / "router_config.json").is_file()
    encoder = _export(saved, tmp_path / "export")
    _assert_matches_st(encoder, _st(saved), "legacy Asym re-saved", (*TASKS, None))


@pytest.mark.slow
def test_a_fine_tuned_model_round_trips(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """What a user does: load, a few optimizer steps through a sentence-transformers loss, save, export."""
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    titles = [samples.titles(language)[7] for language in samples.LANGUAGES]
    skills = [samples.skill_lists(language, count=1, skills_per_list=6)[0] for language in samples.SKILL_LANGUAGES]
    titles = titles[: len(skills)]

    def fine_tune(model: Any) -> None:
        torch.manual_seed(0)
        loss = MultipleNegativesRankingLoss(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(3):
            anchors = model.preprocess(titles, task="anchor")
            positives = model.preprocess(skills, task="positive")
            loss([anchors, positives], labels=None).backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()

    saved = _st_saved(tiny_models["router"], tmp_path / "tuned", fine_tune)
    tuned = _st(saved)
    before = _st(tiny_models["router"]).encode(titles, task="anchor")
    moved = row_cosines(tuned.encode(titles, task="anchor"), before)
    assert moved.min() < 0.999, f"the optimizer steps left the model as it was (cosines {moved})"
    encoder = _export(saved, tmp_path / "export")
    _assert_matches_st(encoder, tuned, "fine-tuned")


@pytest.mark.slow
def test_a_trailing_normalize_is_exported_into_the_heads(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize

    def normalized(model: Any) -> Any:
        return SentenceTransformer(modules=[*model, Normalize()], device="cpu")

    saved = _st_saved(tiny_models["router"], tmp_path / "normalized", normalized)
    assert _read(saved / "modules.json")[3]["type"].endswith("Normalize")
    encoder = _export(saved, tmp_path / "export")
    assert encoder.manifest.raw["architecture"]["normalized"] is True
    _assert_matches_st(encoder, _st(saved), "Normalize")
    lengths = np.linalg.norm(encoder.encode(parity_texts(), task="positive"), axis=1)
    assert np.abs(lengths - 1.0).max() < 1e-6, "the heads' vectors are unit length without normalize_embeddings"


@pytest.mark.slow
def test_a_head_that_loses_its_normalize_fails_validation_by_its_lengths(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cosines cannot see a scale: the lengths are what catch a Normalize the graphs left out."""
    import dataclasses

    from jobbert_onnx.export import ExportValidationError, graphs

    folder = _copy(tiny_models["router"], tmp_path)
    modules = _read(folder / "modules.json")
    modules.append({"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"})
    _write(folder / "modules.json", modules)
    write_head = graphs.write_head

    def without_normalize(path: Path, head: Any) -> None:
        write_head(path, dataclasses.replace(head, normalize=False))

    monkeypatch.setattr(graphs, "write_head", without_normalize)
    with pytest.raises(ExportValidationError, match=r"fp32 head 'anchor': vector lengths off by up to .*%") as error:
        export_model(str(folder), tmp_path / "out", precision="fp32", validate_device="cpu", log=_quiet)
    assert "min cosine" not in str(error.value), "the directions are right: only the lengths are wrong"


@pytest.mark.slow
def test_mapped_tasks_are_routed_as_sentence_transformers_routes_them(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    def mapped(model: Any) -> None:
        model[2].route_mappings = {("query", None): "anchor", ("document", "text"): "positive"}

    saved = _st_saved(tiny_models["router"], tmp_path / "mapped", mapped)
    encoder = _export(saved, tmp_path / "export")
    assert encoder.manifest.task_routes == {"query": "anchor", "document": "positive"}
    _assert_matches_st(encoder, _st(saved), "mapped", ("query", "document", *TASKS))


@pytest.mark.slow
def test_an_encoder_in_its_own_folder(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """modules.json may put the transformer in a folder of its own (its "path"), as early releases did."""
    folder = _copy(tiny_models["router"], tmp_path)
    inner = folder / "0_Transformer"
    inner.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).rename(inner / name)
    (folder / "sentence_bert_config.json").rename(inner / "sentence_bert_config.json")
    modules = _read(folder / "modules.json")
    modules[0]["path"] = "0_Transformer"
    _write(folder / "modules.json", modules)
    encoder = _export(folder, tmp_path / "export")
    assert set(encoder.manifest.raw["source"]["weights_sha256"]) >= {"0_Transformer/model.safetensors"}
    _assert_matches_st(encoder, _st(folder), "0_Transformer")


# ---- every release's names and keys, read without exporting ----


def test_every_known_type_name_is_the_installed_releases_class_of_that_kind() -> None:
    """The table is checked against the library: each name resolves, through sentence-transformers'
    own import (its shims for moved names included), to the class of the kind the exporter reads it as
    (Asym to Router, as 5.x and 6.x load it)."""
    from sentence_transformers.util.misc import import_module_class

    for name, kind in MODULE_TYPES.items():
        assert import_module_class(name).__name__ == ("Router" if kind == "Asym" else kind), name


# Type names as each generation writes them: modules.json's, then the asymmetric module's for Dense.
GENERATIONS = {
    "2.x-4.x": (
        "sentence_transformers.models.Transformer",
        "sentence_transformers.models.Pooling",
        "sentence_transformers.models.Asym",
        "sentence_transformers.models.Dense",
        "sentence_transformers.models.Normalize",
    ),
    "5.0-5.3": (
        "sentence_transformers.models.Transformer",
        "sentence_transformers.models.Pooling",
        "sentence_transformers.models.Router",
        "sentence_transformers.models.Dense.Dense",
        "sentence_transformers.models.Normalize",
    ),
    "5.4-5.7": (
        "sentence_transformers.base.modules.transformer.Transformer",
        "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
        "sentence_transformers.base.modules.router.Router",
        "sentence_transformers.base.modules.dense.Dense",
        "sentence_transformers.sentence_transformer.modules.normalize.Normalize",
    ),
    "6.x": (
        "sentence_transformers.base.modules.transformer.Transformer",
        "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
        "sentence_transformers.base.modules.router.Router",
        "sentence_transformers.base.modules.dense.Dense",
        "sentence_transformers.base.modules.normalize.Normalize",
    ),
}


@pytest.mark.parametrize("generation", GENERATIONS)
def test_each_generations_type_names_are_read(tiny_models: dict[str, Path], tmp_path: Path, generation: str) -> None:
    transformer, pooling, router, dense, normalize = GENERATIONS[generation]
    layout = "legacy-asym" if router.endswith("Asym") else "router"
    folder = _copy(tiny_models[layout], tmp_path)
    modules = _read(folder / "modules.json")
    for entry, name in zip(modules, (transformer, pooling, router), strict=True):
        entry["type"] = name
    modules.append({"idx": 3, "name": "3", "path": "3_Normalize", "type": normalize})
    _write(folder / "modules.json", modules)
    config = folder / modules[2]["path"] / ("config.json" if layout == "legacy-asym" else "router_config.json")
    _edit(config, types=dict.fromkeys(_read(config)["types"], dense))
    spec = read_model(str(folder))
    assert spec.router_kind == ("Asym" if layout == "legacy-asym" else "Router")
    assert spec.normalize and all(head.normalize for head in spec.heads.values())
    assert spec.module_types == (transformer, pooling, router, normalize)


def test_an_unknown_type_name_is_named_with_what_is_read(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(tiny_models["router"], tmp_path)
    config = folder / "2_Router" / "router_config.json"
    _edit(config, types={"anchor_0_Dense": "my_package.MyDense", "positive_0_Dense": "my_package.MyDense"})
    with pytest.raises(UnsupportedModelError, match=r"type 'my_package.MyDense', .* reads Asym, Dense, Normalize"):
        read_model(str(folder))


@pytest.mark.parametrize(
    ("pooling", "accepted"),
    [
        ({"embedding_dimension": 32, "pooling_mode": "mean", "include_prompt": True}, True),
        ({"embedding_dimension": 32, "pooling_mode": ["mean"]}, True),
        ({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}, True),  # 2.x: no later flags
        ({"embedding_dimension": 32, "pooling_mode": "cls"}, False),
        ({"embedding_dimension": 32, "pooling_mode": ["mean", "max"]}, False),
        ({"embedding_dimension": 16, "pooling_mode": "mean"}, False),
    ],
)
def test_pooling_configs_of_every_release(
    tiny_models: dict[str, Path], tmp_path: Path, pooling: dict, accepted: bool
) -> None:
    folder = _copy(tiny_models["router"], tmp_path)
    _write(folder / "1_Pooling" / "config.json", pooling)
    if accepted:
        read_model(str(folder))
    else:
        with pytest.raises(UnsupportedModelError, match=r"pooling in .* (uses|expects dimension)"):
            read_model(str(folder))


def test_the_length_cap_is_read_where_each_release_keeps_it(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(tiny_models["router"], tmp_path)
    config, tokenizer = folder / "sentence_bert_config.json", folder / "tokenizer_config.json"
    _edit(tokenizer, model_max_length=512)  # all-MiniLM-L6-v2's kind: every release takes max_seq_length
    spec = read_model(str(folder))
    assert (spec.max_seq_length, spec.length_source) == (64, "sentence_bert_config.json (max_seq_length)")
    _write(config, {"transformer_task": "feature-extraction"})  # 5.4 and later keep it in the tokenizer's config
    _edit(tokenizer, model_max_length=48)
    spec = read_model(str(folder))
    assert (spec.max_seq_length, spec.length_source) == (48, "tokenizer_config.json (model_max_length)")
    _edit(config, processor_kwargs={"model_max_length": 40})
    assert read_model(str(folder)).max_seq_length == 40
    _edit(config, max_seq_length=64)
    with pytest.raises(
        UnsupportedModelError, match=r"max_seq_length=64 and, .* model_max_length=40: .* make them agree"
    ):
        read_model(str(folder))
    _edit(config, max_seq_length=None, processor_kwargs=None)
    _edit(tokenizer, model_max_length=None)
    with pytest.raises(UnsupportedModelError, match=r"no integer model_max_length .* set model.max_seq_length"):
        read_model(str(folder))
    _edit(config, max_seq_length=600)
    with pytest.raises(UnsupportedModelError, match=r"length cap 600 .* is not in \[2, 512\]"):
        read_model(str(folder))


def _dense_config(folder: Path, **changes: Any) -> None:
    for name in ("anchor_0_Dense", "positive_0_Dense"):
        _edit(folder / "2_Router" / name / "config.json", **changes)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: _dense_config(f, use_residual=True), r"adds its input back \(use_residual\)"),
        (lambda f: _dense_config(f, module_input_name="token_embeddings"), r"reads 'token_embeddings'"),
        (
            lambda f: _edit(f / "sentence_bert_config.json", transformer_task="fill-mask"),
            r"transformer_task='fill-mask'; the exporter reads sentence encoders only",
        ),
        (
            lambda f: _edit(f / "sentence_bert_config.json", processing_kwargs={"text": {"padding": "max_length"}}),
            r"processing_kwargs=.* change how texts are tokenized",
        ),
        (
            lambda f: _edit(f / "sentence_bert_config.json", tokenizer_args={"add_prefix_space": False}),
            r"passes tokenizer_args \['add_prefix_space'\]",
        ),
        (
            lambda f: _edit(
                f / "config_sentence_transformers.json", default_prompt_name="query", prompts={"query": "q: "}
            ),
            r"puts the default prompt 'query' \('q: '\) in front of every text.* set default_prompt_name to null",
        ),
        (
            lambda f: _edit(f / "config_sentence_transformers.json", model_type="SparseEncoder"),
            r"describes a SparseEncoder",
        ),
        (
            lambda f: _edit(
                f / "2_Router" / "router_config.json",
                structure={"anchor": ["anchor_0_Dense", "norm"], "positive": ["positive_0_Dense"]},
                types={
                    "anchor_0_Dense": "sentence_transformers.models.Dense.Dense",
                    "positive_0_Dense": "sentence_transformers.models.Dense.Dense",
                    "norm": "sentence_transformers.models.Normalize.Normalize",
                },
            ),
            r"only one route of the Router module .* ends in Normalize",
        ),
        (
            lambda f: _edit(f / "2_Router" / "router_config.json", parameters={"route_mappings": {"query": "anchor"}}),
            r"route_mappings key 'query' is not a \(task, modality\) pair",
        ),
    ],
)
def test_what_the_exporter_cannot_read_is_named(
    tiny_models: dict[str, Path], tmp_path: Path, change: Callable[[Path], None], message: str
) -> None:
    folder = _copy(tiny_models["router"], tmp_path)
    change(folder)
    with pytest.raises(UnsupportedModelError, match=message):
        export_model(str(folder), tmp_path / "out", log=_quiet)
    assert not (tmp_path / "out").exists()


def test_an_empty_default_prompt_and_a_normalize_in_each_route_are_read(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    folder = _copy(tiny_models["router"], tmp_path)
    _edit(folder / "config_sentence_transformers.json", default_prompt_name="query")  # its prompt is ""
    structure = {route: [f"{route}_0_Dense", f"{route}_1_Normalize"] for route in TASKS}
    types = {name: "sentence_transformers.models.Dense.Dense" for name in ("anchor_0_Dense", "positive_0_Dense")}
    types |= {f"{route}_1_Normalize": "sentence_transformers.models.Normalize.Normalize" for route in TASKS}
    _edit(folder / "2_Router" / "router_config.json", structure=structure, types=types)
    spec = read_model(str(folder))
    assert spec.normalize and spec.output_dim == 1024


# Router parameters as a user may save them, and what sentence-transformers makes of them.
ROUTINGS = [
    {"default_route": "anchor", "allow_empty_key": True},
    {"allow_empty_key": True},  # the first route (here: positive) is the default
    {"allow_empty_key": False},  # no default: every call names its task
    {"default_route": "positive", "route_mappings": {"('query', None)": "anchor", "('query', 'text')": "positive"}},
    {"route_mappings": {"('query', None)": "anchor", "(None, 'image')": "anchor", "('document', 'image')": "anchor"}},
    {"default_route": "anchor", "route_mappings": {"(None, None)": "positive"}},
    {"default_route": "positive", "route_mappings": {"(None, 'text')": "anchor", "(None, None)": "positive"}},
]


@pytest.fixture(scope="module")
def head_vectors(tiny_models: dict[str, Path]) -> dict[str, np.ndarray]:
    """Each head's vector of one title, from the unmapped model: what tells a route by its output."""
    model = _st(tiny_models["router"])
    return {route: model.encode(["Data Scientist"], task=route) for route in TASKS}


@pytest.mark.parametrize("parameters", ROUTINGS)
def test_tasks_reach_the_head_sentence_transformers_sends_them_to(
    tiny_models: dict[str, Path], tmp_path: Path, parameters: dict, head_vectors: dict[str, np.ndarray]
) -> None:
    folder = _copy(tiny_models["router"], tmp_path)
    config = folder / "2_Router" / "router_config.json"
    _edit(config, parameters=parameters, structure={"positive": ["positive_0_Dense"], "anchor": ["anchor_0_Dense"]})
    spec = read_model(str(folder))
    model = _st(folder)
    for task in (None, *TASKS, "query", "document", "other"):
        ours = route_for(task, TASKS, spec.default_route, spec.task_routes, spec.catch_all_route)
        try:
            vector = model.encode(["Data Scientist"], task=task)
        except ValueError:
            assert ours is None, f"sentence-transformers refuses task={task!r}; we route it to {ours!r}"
            continue
        theirs = [route for route, expected in head_vectors.items() if np.array_equal(vector, expected)]
        assert theirs == [ours], f"task={task!r}: sentence-transformers uses {theirs}, we {ours!r} ({parameters})"


def test_the_runtime_routes_mapped_and_unmapped_tasks(tiny_exports: dict, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_exports[("router", "fp32")], tmp_path / "export"))
    manifest = _read(folder / "manifest.json")
    manifest["architecture"] |= {"default_route": None, "task_routes": {"query": "positive"}}
    _write(folder / "manifest.json", manifest)
    encoder = Encoder.load(folder, device="cpu", precision="fp32")
    texts = ["Data Scientist", "python, sql"]
    assert_close(encoder.encode(texts, task="query"), encoder.encode(texts, task="positive"), 0.0, "query")
    assert encoder.default_task is None
    with pytest.raises(UsageError, match="no default task; pass task= one of: anchor, positive, query"):
        encoder.encode(texts)
    with pytest.raises(UsageError, match="unknown task 'document'; this model has: anchor, positive, query"):
        encoder.encode(texts, task="document")


def test_a_schema_3_export_still_loads(tiny_exports: dict, tmp_path: Path) -> None:
    """Exports written before tasks could be mapped read as having no mappings."""
    folder = Path(shutil.copytree(tiny_exports[("router", "fp32")], tmp_path / "export"))
    manifest = _read(folder / "manifest.json")
    manifest["schema_version"] = 3
    for key in ("task_routes", "catch_all_route", "normalized", "include_prompt"):
        del manifest["architecture"][key]
    _write(folder / "manifest.json", manifest)
    encoder = Encoder.load(folder, device="cpu", precision="fp32")
    assert encoder.default_task == "anchor" and encoder.manifest.task_routes == {}
    reference = Encoder.load(tiny_exports[("router", "fp32")], device="cpu", precision="fp32")
    assert_close(encoder.encode(["Koch"], task="positive"), reference.encode(["Koch"], task="positive"), 0.0, "v3")


def test_a_prompt_is_refused_where_the_model_pools_without_it(tiny_exports: dict, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_exports[("router", "fp32")], tmp_path / "export"))
    manifest = _read(folder / "manifest.json")
    manifest["architecture"]["include_prompt"] = False
    _write(folder / "manifest.json", manifest)
    encoder = Encoder.load(folder, device="cpu", precision="fp32")
    encoder.encode(["Koch"])
    with pytest.raises(UsageError, match=r"pools without its prompt's tokens \(include_prompt=false\)"):
        encoder.encode(["Koch"], prompt="title: ")
