"""An XLM-R-shaped stand-in tokenizer, trained on real job titles.

The real 250,002-piece XLM-R vocabulary cannot be shipped or fetched offline, so
random-weight test models get a SentencePiece Unigram tokenizer trained with
`tokenizers` on the titles in `_data/`, shaped like XLM-R's: the same special
tokens and ids (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>``=250001),
Metaspace pre-tokenization, ``<s> ... </s>`` framing, and a vocabulary padded to
250,002 pieces with filler pieces that never win a segmentation.
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from jobbert_onnx import samples

XLMR_VOCAB_SIZE = 250_002
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
MASK = "<mask>"
_TRAINED_PIECES = 8_000
_FILLER_SCORE = -100.0


def _training_texts() -> list[str]:
    texts = []
    for language in samples.LANGUAGES:
        texts += samples.titles(language)
    for language in samples.SKILL_LANGUAGES:
        texts += samples.skills(language)
    return texts


def build_xlmr_like_tokenizer(truncation_length: int = 128) -> Tokenizer:
    """Train the stand-in tokenizer (about a second) and return it.

    Args:
        truncation_length: The truncation stored in the file. The real JobBERT-v3
            ``tokenizer.json`` carries 128, not the model's 64-token cap; the
            default keeps that trap so the exporter is tested against it.
    """
    trainer_model = Tokenizer(models.Unigram())
    trainer_model.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    trainer_model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=_TRAINED_PIECES, special_tokens=list(SPECIALS), unk_token="<unk>", show_progress=False
    )
    trainer_model.train_from_iterator(_training_texts(), trainer)
    # Rebuild the Unigram model with rounded scores (training is not bit-stable
    # across runs) and the XLM-R id layout.
    trained = json.loads(trainer_model.to_str())["model"]["vocab"]
    vocab: list[tuple[str, float]] = [(special, 0.0) for special in SPECIALS]
    vocab += [(piece, round(score, 6)) for piece, score in trained if piece not in SPECIALS]
    filler = 0
    while len(vocab) < XLMR_VOCAB_SIZE - 1:
        vocab.append((f"<unused{filler}>", _FILLER_SCORE))
        filler += 1
    vocab.append((MASK, 0.0))

    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tokenizer.normalizer = trainer_model.normalizer
    tokenizer.pre_tokenizer = trainer_model.pre_tokenizer
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=True
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tokenizer.add_special_tokens([AddedToken(MASK, special=True, normalized=False, lstrip=True)])
    tokenizer.enable_truncation(max_length=truncation_length)
    return tokenizer
