"""Write the export's tokenizer.json: the source's tokenizer, capped at the model's length."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from jobbert_onnx.export.hf import load_tokenizer
from jobbert_onnx.export.source import ModelSpec, UnsupportedModelError

# XLM-R's special tokens and the ids the encoder was trained with.
XLMR_SPECIAL_IDS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}


def write_tokenizer(spec: ModelSpec, path: Path) -> None:
    """Write the tokenizer sentence-transformers runs, truncating at `max_seq_length`, padding right.

    The pipeline is taken from transformers' tokenizer as loaded from the source
    folder, not copied from the source ``tokenizer.json``: transformers 5 rebuilds
    XLM-R's pre-tokenizer and post-processor from its tokenizer class, and the
    vectors must match what sentence-transformers computes. The cap comes from
    ``sentence_bert_config.json`` (64 for JobBERT-v3), not from the truncation in
    the source files (128 in the real ones).
    """
    source = spec.folder / "tokenizer.json"
    loaded = load_tokenizer(spec)
    backend = getattr(loaded, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedModelError(
            f"transformers loaded {type(loaded).__name__} from {spec.folder}, not a fast tokenizer"
        )
    tokenizer = Tokenizer.from_str(backend.to_str())
    for token, expected in XLMR_SPECIAL_IDS.items():
        found = tokenizer.token_to_id(token)
        if found != expected:
            raise UnsupportedModelError(f"{source} maps {token} to id {found}; XLM-R uses {expected}")
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > int(spec.encoder_config["vocab_size"]):
        raise UnsupportedModelError(
            f"{source} has {vocab} tokens but the encoder's embedding table has {spec.encoder_config['vocab_size']}"
        )
    pad_id = int(spec.encoder_config.get("pad_token_id", 1))
    tokenizer.enable_truncation(max_length=spec.max_seq_length, strategy="longest_first", direction="right")
    tokenizer.enable_padding(direction="right", pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id))
    tokenizer.save(str(path))
