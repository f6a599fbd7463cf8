"""The genuine XLM-R tokenizer, shipped xz-compressed with the package (see `_data/SOURCES.md`).

250,002 SentencePiece Unigram pieces with the ids JobBERT-v3 was trained on. The
random-weight models are built with it, so token counts, truncation and
benchmark lengths are the real model's.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
from importlib import resources

from tokenizers import Tokenizer

from jobbert_onnx.errors import SetupError

PACKAGED = "xlmr_tokenizer.json.xz"
# sha256 of the decompressed file, as published with it (`_data/SOURCES.md`).
SHA256 = "0b44a9d7b51c3c62626640cda0e2c2f70fdacdc25bbbd68038369d14ebdf4c39"
VOCAB_SIZE = 250_002


@functools.cache
def xlmr_tokenizer_json() -> str:
    """The tokenizer.json text, checked against its published sha256.

    Raises:
        RuntimeError: The shipped file is damaged; reinstall jobbert-onnx.
    """
    packed = resources.files("jobbert_onnx").joinpath("_data", PACKAGED).read_bytes()
    raw = lzma.decompress(packed)
    found = hashlib.sha256(raw).hexdigest()
    if found != SHA256:
        raise SetupError(f"the shipped {PACKAGED} has sha256 {found}, not {SHA256}: reinstall jobbert-onnx")
    return raw.decode("utf-8")


def xlmr_tokenizer() -> Tokenizer:
    """A fresh `tokenizers.Tokenizer` of the genuine XLM-R vocabulary (no truncation, no padding)."""
    return Tokenizer.from_str(xlmr_tokenizer_json())
