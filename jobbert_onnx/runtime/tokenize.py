"""Text -> token ids: the first stage, on the CPU.

Texts are tokenized once without padding, so their lengths are known before
batching; each batch is then padded on the right to the width its plan gives
(`batching.plan_batches`: its longest row, or the top of its length bucket where
`Tuning.pad_to_bucket` is on, the CUDA default), and to the plan's height with
filler rows (only CUDA graphs round the height up).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from jobbert_onnx.manifest import ManifestError


@dataclass(frozen=True)
class Tokenized:
    """Token ids of many texts, unpadded, and their lengths."""

    ids: list[list[int]]
    lengths: np.ndarray


@dataclass(frozen=True)
class Batch:
    """One padded batch: what the encoder graph takes."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


class TextTokenizer:
    """The export's `tokenizer.json`, truncating at the model's cap."""

    def __init__(self, path: Path, max_seq_length: int) -> None:
        tokenizer = Tokenizer.from_file(str(path))
        truncation = tokenizer.truncation
        if not truncation or truncation.get("max_length") != max_seq_length:
            found = truncation.get("max_length") if truncation else None
            raise ManifestError(
                f"{path} truncates at {found} tokens but the model takes {max_seq_length}; export the model again"
            )
        padding = tokenizer.padding
        pad_id = padding["pad_id"] if padding else tokenizer.token_to_id("<pad>")
        if pad_id is None:
            raise ManifestError(f"{path} sets no padding and has no <pad> token; export the model again")
        self.pad_id = int(pad_id)
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        # Filler rows hold what an empty text tokenizes to (``<s></s>``), so no attention
        # kernel ever sees a row without a single real key.
        self._filler = tokenizer.encode("", add_special_tokens=True).ids[:max_seq_length] or [self.pad_id]

    def tokenize(self, texts: list[str]) -> Tokenized:
        """Token ids with ``<s> ... </s>``, truncated to the cap, not padded."""
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=True)
        ids = [encoding.ids for encoding in encodings]
        lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
        return Tokenized(ids=ids, lengths=lengths)

    def pad(self, tokenized: Tokenized, rows: np.ndarray, width: int | None = None, height: int | None = None) -> Batch:
        """Pad the chosen rows on the right.

        Args:
            tokenized: Output of `tokenize`.
            rows: Which of its rows, in batch order.
            width: Padded length (default: the longest chosen row).
            height: Rows in the batch (default: len(rows)); extra rows are filler:
                an empty text's tokens (``<s></s>``), whose vectors the caller drops.
        """
        real = tokenized.lengths[rows]
        width = int(real.max(initial=len(self._filler))) if width is None else width
        filler = self._filler[:width]
        lengths = np.full(height if height is not None else len(rows), len(filler), dtype=np.int64)
        lengths[: len(rows)] = real
        input_ids = np.full((len(lengths), width), self.pad_id, dtype=np.int64)
        for out_row, row in enumerate(rows):
            input_ids[out_row, : lengths[out_row]] = tokenized.ids[row]
        input_ids[len(rows) :, : len(filler)] = filler
        attention_mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        return Batch(input_ids=input_ids, attention_mask=attention_mask)
