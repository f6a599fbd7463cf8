"""Text -> token ids: the first stage, on the CPU.

Texts are tokenized once without padding, so their lengths are known before
batching; each batch is then padded on the right to the width its plan gives
(`batching.plan_batches`: its longest row, or the top of its length bucket where
`Tuning.pad_to_bucket` is on, the CUDA default), and to the plan's height with
filler rows (only CUDA graphs round the height up).

The tokenizer (Rust) runs a call's texts on every core and releases the GIL
meanwhile, so tokenizing ahead in a thread (`Tuning.overlap`) does not stall the
thread that drives the device; offsets, which nothing here reads, are not computed.
Padding gathers a batch's rows from one flat table of the chunk's ids with numpy,
not row by row.

Leading and trailing whitespace is stripped first (`TextTokenizer.tokenize` says why).
Long texts are cut before tokenizing (`cut_long_text`): the model keeps only its
first tokens, and tokenizing a 3,000-character text whole to keep 64 of its
tokens cost 6x a skill list's time. The cut is at a space between two printable
ASCII characters, beyond which nothing changes how earlier words tokenize (the
normalizer maps graphemes, and such a space is one of its own; words are split
at whitespace and tokenized alone); when the cut text does not reach the cap,
the whole text is tokenized instead. The ids are those of the whole text
either way (tests/test_tokenizer.py checks it on real and generated texts).
"""

from __future__ import annotations

import functools
import itertools
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

    @functools.cached_property
    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row's ids end to end, and where each row starts: what `pad` gathers from, made
        once per tokenized chunk, so no batch copies its rows one by one."""
        flat = np.fromiter(itertools.chain.from_iterable(self.ids), dtype=np.int64, count=int(self.lengths.sum()))
        starts = np.zeros(len(self.lengths), dtype=np.int64)
        np.cumsum(self.lengths[:-1], out=starts[1:])
        return flat, starts


@dataclass(frozen=True)
class Batch:
    """One padded batch: what the encoder graph takes."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


# Characters kept per token of the cap: texts longer than this many characters per token
# are cut (64 tokens: 512 characters; the ESCO skill lists reach the cap within 400).
CUT_CHARS_PER_TOKEN = 8


def cut_long_text(text: str, limit: int) -> str:
    """`text` up to its last space within `limit` characters that has a printable ASCII character
    on either side; `text` itself where it is not longer than `limit` or has no such space.

    Such a space is a grapheme of its own (ASCII characters neither extend the grapheme before
    them nor attach to the one after), so the normalizer, which maps graphemes, maps the text
    before it as it would alone; the space ends a word, and words tokenize alone.
    """
    if len(text) <= limit:
        return text
    at = text.rfind(" ", 0, limit + 1)
    while at > 0:
        before, after = text[at - 1], text[at + 1 : at + 2]
        if " " < before <= "~" and " " < after <= "~":
            return text[:at]
        at = text.rfind(" ", 0, at)
    return text


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
        self.cut_chars = CUT_CHARS_PER_TOKEN * max_seq_length
        # Without offsets where this `tokenizers` can (0.21 on): the same ids, a fifth faster.
        self._encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        # Filler rows hold what an empty text tokenizes to (``<s></s>``), so no attention
        # kernel ever sees a row without a single real key.
        self._filler = tokenizer.encode("", add_special_tokens=True).ids[:max_seq_length] or [self.pad_id]

    def tokenize(self, texts: list[str]) -> Tokenized:
        """Token ids with ``<s> ... </s>``, truncated to the cap, not padded.

        Texts are stripped of leading and trailing whitespace first, as sentence-transformers
        did up to 5.3 (JobBERT-v3 was trained and published with it). transformers 5's XLM-R
        tokenizer splits on whitespace, so there it changes nothing; the pipeline transformers 4
        writes keeps a trailing space as a token of its own, and an export made with it would
        otherwise give " Koch " another vector than "Koch".
        """
        texts = [text.strip() for text in texts]
        cut = list(texts)
        long = [row for row, text in enumerate(texts) if len(text) > self.cut_chars]
        for row in long:
            cut[row] = cut_long_text(texts[row], self.cut_chars)
        ids = [encoding.ids for encoding in self._encode(cut, add_special_tokens=True)]
        short = [row for row in long if cut[row] is not texts[row] and len(ids[row]) < self.max_seq_length]
        if short:  # the cut text did not reach the cap: the whole text decides
            whole = self._encode([texts[row] for row in short], add_special_tokens=True)
            for row, encoding in zip(short, whole, strict=True):
                ids[row] = encoding.ids
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
        positions = np.arange(width)
        attention_mask = (positions[None, :] < lengths[:, None]).astype(np.int64)
        input_ids = np.full((len(lengths), width), self.pad_id, dtype=np.int64)
        if len(rows):
            flat, starts = tokenized.flat
            real_mask = attention_mask[: len(rows)].astype(bool)
            gather = np.minimum(starts[rows][:, None] + positions[None, :], max(len(flat) - 1, 0))
            input_ids[: len(rows)][real_mask] = flat[gather[real_mask]]
        input_ids[len(rows) :, : len(filler)] = filler
        return Batch(input_ids=input_ids, attention_mask=attention_mask)
