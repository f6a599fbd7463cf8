"""The genuine XLM-R tokenizer ships with the package, and the export's tokenizer gives transformers' ids."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import parity_texts
from tokenizers import Tokenizer

from jobbert_onnx import samples
from jobbert_onnx.export.xlmr_tokenizer import SHA256, VOCAB_SIZE, xlmr_tokenizer, xlmr_tokenizer_json

# The ids published with the tokenizer (jobbert_onnx/_data/SOURCES.md).
PUBLISHED = {
    "Hello world": [0, 35378, 8999, 2],
    "Hello World!": [0, 35378, 6661, 38, 2],
    "Software Engineer": [0, 23752, 90125, 56, 2],
    "Produktmanager": [0, 13643, 141395, 2],
    "高级软件开发人员": [0, 6, 73421, 24888, 15160, 10847, 2],
    "Científica de datos": [0, 2079, 33, 5233, 22346, 8, 13084, 2],
}


def _texts() -> list[str]:
    long_title = " ".join(samples.titles("de")[:40])
    long_skills = ", ".join(samples.skills("es")[:60])
    return [
        *parity_texts(),
        *samples.titles("zh")[:20],
        *samples.skill_lists("en", count=5, skills_per_list=12),
        long_title,
        long_skills,
        "Ünïcode ｆｕｌｌwidth",
        "tab\tand\nnewline",
        "  leading and trailing  ",
        "Barista ☕ & Koch 👨‍🍳🔥",
        "مهندس برمجيات",  # Arabic, right to left
        "מפתח תוכנה בכיר",  # Hebrew, right to left
        "データサイエンティスト",
        "소프트웨어 엔지니어",
        "\u200bzero\u200bwidth\u200b",
        "   ",
        "\n\t",
        "",
    ]


def test_the_shipped_tokenizer_is_the_published_one() -> None:
    assert hashlib.sha256(xlmr_tokenizer_json().encode("utf-8")).hexdigest() == SHA256
    tokenizer = xlmr_tokenizer()
    assert tokenizer.get_vocab_size() == VOCAB_SIZE == 250_002
    ids = {t: tokenizer.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")}
    assert ids == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 250_001}
    for text, expected in PUBLISHED.items():
        assert tokenizer.encode(text).ids == expected, text


def test_transformers_reads_the_published_ids(tiny_models: dict[str, Path]) -> None:
    from transformers import XLMRobertaTokenizerFast

    reference = XLMRobertaTokenizerFast.from_pretrained(str(tiny_models["router"]))
    for text, expected in PUBLISHED.items():
        assert reference(text)["input_ids"] == expected, text


def test_ids_and_truncation_match_transformers(tiny_models: dict[str, Path], tiny_exports: dict) -> None:
    from transformers import XLMRobertaTokenizerFast

    reference = XLMRobertaTokenizerFast.from_pretrained(str(tiny_models["router"]))
    exported = Tokenizer.from_file(str(tiny_exports[("router", "fp32")] / "tokenizer.json"))
    exported.no_padding()
    texts = _texts()
    expected = reference(texts, truncation=True, max_length=64)["input_ids"]
    got = [e.ids for e in exported.encode_batch(texts)]
    for text, a, b in zip(texts, got, expected, strict=True):
        assert a == b, f"{text[:60]!r}: {a} != {b}"
    assert max(len(ids) for ids in got) == 64, "the over-long inputs must be cut at 64 tokens"
    assert all(ids[0] == 0 and ids[-1] == 2 for ids in got), "every input is framed <s> ... </s>"
    assert got[-1] == got[-2] == [0, 2], "empty and whitespace-only texts are <s></s>"


@pytest.mark.parametrize(("language", "low", "high"), [("en", 6, 9), ("es", 8, 12), ("de", 7, 11), ("zh", 5, 9)])
def test_titles_have_the_real_models_lengths(tiny_exports: dict, language: str, low: float, high: float) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_exports[("router", "fp32")] / "tokenizer.json"))
    tokenizer.no_padding()
    lengths = [len(e.ids) for e in tokenizer.encode_batch(samples.titles(language))]
    assert low <= sum(lengths) / len(lengths) <= high


def test_cap_is_max_seq_length_not_the_source_files_128(tiny_models: dict[str, Path], tiny_exports: dict) -> None:
    source = json.loads((tiny_models["router"] / "tokenizer.json").read_text())
    assert source["truncation"]["max_length"] == 128, "the fixture keeps the trap of the real files"
    exported = json.loads((tiny_exports[("router", "fp32")] / "tokenizer.json").read_text())
    assert exported["truncation"]["max_length"] == 64
    assert exported["padding"]["direction"] == "Right"
    assert exported["padding"]["pad_id"] == 1
