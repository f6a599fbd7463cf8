"""Write the export's tokenizer.json: the source's tokenizer, capped at the model's length."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from jobbert_onnx.export.hf import load_tokenizer
from jobbert_onnx.export.source import ModelSpec, UnsupportedModelError


def write_tokenizer(spec: ModelSpec, path: Path) -> None:
    """Write the tokenizer sentence-transformers runs, truncating at `max_seq_length`, padding right.

    The pipeline is taken from transformers' tokenizer as loaded from the source
    folder, not copied from the source ``tokenizer.json``: transformers 5 rebuilds
    XLM-R's pre-tokenizer and post-processor from its tokenizer class, and the
    vectors must match what sentence-transformers computes. The cap is the one
    sentence-transformers applies (`st_format.length_cap`: 64 for JobBERT-v3), not the
    truncation in the source files (128 in the real ones).
    """
    source = spec.encoder_folder / "tokenizer.json"
    loaded = load_tokenizer(spec)
    backend = getattr(loaded, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedModelError(
            f"transformers loaded {type(loaded).__name__} from {spec.encoder_folder}, not a fast tokenizer"
        )
    tokenizer = Tokenizer.from_str(backend.to_str())
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > int(spec.encoder_config["vocab_size"]):
        raise UnsupportedModelError(
            f"{source} has {vocab} tokens but the encoder's embedding table has {spec.encoder_config['vocab_size']}"
        )
    tokenizer.no_padding()
    tokenizer.no_truncation()
    pad_id = check_special_tokens(tokenizer, loaded, spec)
    tokenizer.enable_truncation(max_length=spec.max_seq_length, strategy="longest_first", direction="right")
    tokenizer.enable_padding(direction="right", pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id))
    tokenizer.save(str(path))


def check_special_tokens(tokenizer: Tokenizer, loaded: Any, spec: ModelSpec) -> int:
    """Check the special tokens against each other and the encoder; returns the pad id.

    The pad id is read from the tokenizer and must be the config's ``pad_token_id``: the
    encoder masks padding by it, and XLM-R numbers positions from it (a text's first token
    gets position ``pad_token_id + 1``), so a disagreement shifts every position. Every text
    must be wrapped in the tokenizer's own start and end tokens (``<s> ... </s>`` for XLM-R,
    ``[CLS] ... [SEP]`` for BERT), as the encoder was trained.
    """
    source = spec.encoder_folder / "tokenizer.json"
    config_pad = int(spec.encoder_config["pad_token_id"])
    pad_id = loaded.pad_token_id
    if pad_id != config_pad:
        raise UnsupportedModelError(
            f"the tokenizer pads with id {pad_id} ({loaded.pad_token!r}) but {spec.encoder_folder / 'config.json'} has "
            f"pad_token_id {config_pad}: the encoder would take padding for text (and XLM-R shift its positions); "
            "make the two agree"
        )
    start, end = loaded.cls_token_id, loaded.sep_token_id
    wrapped = tokenizer.encode("", add_special_tokens=True).ids
    if start is None or end is None or wrapped != [start, end]:
        raise UnsupportedModelError(
            f"{source} wraps an empty text as {wrapped}; its start and end tokens are "
            f"{loaded.cls_token!r} ({start}) and {loaded.sep_token!r} ({end}): a sentence encoder's tokenizer "
            "adds both to every text"
        )
    vocab = int(spec.encoder_config["vocab_size"])
    for name, token_id in (("pad", pad_id), ("start", start), ("end", end)):
        if not 0 <= token_id < vocab:
            raise UnsupportedModelError(
                f"the tokenizer's {name} token id {token_id} is outside the encoder's vocabulary of {vocab}"
            )
    return int(pad_id)
