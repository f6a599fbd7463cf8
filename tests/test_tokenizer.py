"""The genuine XLM-R tokenizer ships with the package, and the export's tokenizer gives transformers' ids."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import parity_texts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from jobbert_onnx import samples
from jobbert_onnx.export.xlmr_tokenizer import SHA256, VOCAB_SIZE, xlmr_tokenizer, xlmr_tokenizer_json
from jobbert_onnx.runtime.tokenize import TextTokenizer, cut_long_text

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


@functools.cache
def _tokenizers(folder: Path) -> tuple[TextTokenizer, Tokenizer]:
    """The runtime's tokenizer of an export, and the export's tokenizer as it comes (loaded once)."""
    whole = Tokenizer.from_file(str(folder / "tokenizer.json"))
    whole.no_padding()
    return TextTokenizer(folder / "tokenizer.json", 64), whole


def _whole_text_ids(folder: Path, texts: list[str]) -> list[list[int]]:
    """The export's tokenizer on every text whole (offsets and all), truncated at its cap."""
    return [e.ids for e in _tokenizers(folder)[1].encode_batch(texts, add_special_tokens=True)]


# Characters around which a cut could go wrong: combining marks, a grapheme "prepend" mark, zero-width
# joiners, no-break and ideographic spaces, full-width forms, tabs and newlines, the <mask> token (which
# takes the space before it), characters the normalizer expands or drops.
_TRICKY = [" ", " ", " ", "\t", "\n", "\u0301", "\u0600", "\u200d", "\u00a0", "\u3000", "ｆ", "ﷺ", "\u200b", "<mask>"]
_WORDS = st.lists(
    st.one_of(
        st.sampled_from(_TRICKY),
        st.sampled_from([*samples.skills("de")[:200], *samples.titles("zh")[:100], "https://x.org/a_b-c", "Ⅻ"]),
        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12),
    ),
    min_size=40,
    max_size=400,
)


def test_long_texts_cut_before_tokenizing_keep_the_whole_texts_ids(tiny_exports: dict) -> None:
    """Real titles and skill lists, alone and run together far past the cap, in every language."""
    folder = tiny_exports[("router", "fp32")]
    tokenizer = _tokenizers(folder)[0]
    titles = [t for language in samples.LANGUAGES for t in samples.titles(language)]
    texts = [
        *titles,
        *(
            ", ".join(samples.skills(language)[i : i + n])
            for language in ("en", "de", "es")
            for i in range(0, 3000, 97)
            for n in (20, 60, 200)
        ),
        *(" ".join(titles[i : i + 120]) for i in range(0, len(titles) - 120, 37)),
        *("".join(samples.titles("zh")[i : i + 300]) for i in range(0, 1500, 100)),  # no space: never cut
        "python " * 2000,
        "ß" * 600 + " end",  # no ASCII character before any space within the limit
    ]
    assert tokenizer.tokenize(texts).ids == _whole_text_ids(folder, texts)
    cut = sum(cut_long_text(t, tokenizer.cut_chars) is not t for t in texts)
    assert cut > 300, f"only {cut} texts were cut: the test would not see a wrong cut"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=_WORDS, separators=st.lists(st.sampled_from(["", " ", ", ", "  "]), min_size=1, max_size=4))
def test_generated_texts_cut_before_tokenizing_keep_the_whole_texts_ids(
    tiny_exports: dict, words: list[str], separators: list[str]
) -> None:
    folder = tiny_exports[("router", "fp32")]
    tokenizer = _tokenizers(folder)[0]
    text = "".join(word + separators[i % len(separators)] for i, word in enumerate(words))
    texts = [text, text[: tokenizer.cut_chars + 1], text[: tokenizer.cut_chars - 1] + " x"]
    assert tokenizer.tokenize(texts).ids == _whole_text_ids(folder, texts)


def test_the_cut_lands_only_between_ascii_characters_and_keeps_the_ids_at_its_edge(tiny_exports: dict) -> None:
    """Every pair of characters around the space where a cut could land, the cut placed exactly there."""
    folder = tiny_exports[("router", "fp32")]
    tokenizer = _tokenizers(folder)[0]
    limit = tokenizer.cut_chars
    edges = ["a", ",", ")", "~", "ß", "é", "\u0301", "\u0600", "\u200d", "\u00a0", "高", "ｆ", "ﷺ", ">", "<mask>"]
    texts = []
    for before in edges:
        for after in edges:
            head = ("sql " * limit)[: limit - len(before)] + before
            texts.append(head + " " + after + " python" * 80)
    assert tokenizer.tokenize(texts).ids == _whole_text_ids(folder, texts)
    printable = set(map(chr, range(0x21, 0x7F)))
    for text in texts:
        kept = cut_long_text(text, limit)
        at = len(kept)
        assert at <= limit and text.startswith(kept) and text[at] == " "
        assert {text[at - 1], text[at + 1]} <= printable, repr(text[at - 3 : at + 4])
        later = [i for i in range(at + 1, limit + 1) if text[i] == " " and {text[i - 1], text[i + 1]} <= printable]
        assert not later, "the last such space within the limit"
    assert cut_long_text("ü " * 600, limit) == "ü " * 600, "no space between ASCII characters: not cut"


def test_edge_whitespace_is_stripped_as_sentence_transformers_did(tiny_exports: dict, tmp_path: Path) -> None:
    """sentence-transformers up to 5.3 stripped every text; transformers 5's XLM-R tokenizer (what the
    export writes here) splits on whitespace, so stripping changes none of its ids; the pipeline
    transformers 4 writes (the published tokenizer.json's) keeps a trailing space as a token (id 6).
    An export made with transformers 4 must still encode " Koch " as "Koch"."""
    from jobbert_onnx import Encoder
    from jobbert_onnx.manifest import sha256_file

    exported = Tokenizer.from_file(str(tiny_exports[("router", "fp32")] / "tokenizer.json"))
    for space in (chr(c) for c in range(0x110000) if chr(c).isspace()):
        assert exported.encode(f"{space}Koch{space}").ids == exported.encode("Koch").ids, hex(ord(space))
    del exported  # the 250,002-piece tokenizers weigh hundreds of MB each: one at a time

    edged = [" Koch ", "Data Scientist\n", "\tPython, SQL  ", "\u3000软件工程师\u3000", "\u00a0Barista"]
    stripped = [text.strip() for text in edged]
    written_by_transformers_4 = xlmr_tokenizer()
    raw = [[e.ids for e in written_by_transformers_4.encode_batch(texts)] for texts in (edged, stripped)]
    assert raw[0] != raw[1], "this pipeline keeps edge whitespace: without the strip the test could not fail"
    folder = Path(shutil.copytree(tiny_exports[("router", "fp32")], tmp_path / "export"))
    path = folder / "tokenizer.json"
    written_by_transformers_4.enable_truncation(max_length=64)
    written_by_transformers_4.enable_padding(pad_id=1, pad_token="<pad>")
    written_by_transformers_4.save(str(path))
    del written_by_transformers_4
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    encoder = Encoder.load(folder, device="cpu", precision="fp32")
    assert encoder.tokenizer.tokenize(edged).ids == encoder.tokenizer.tokenize(stripped).ids
    assert (encoder.encode(edged, task="anchor") == encoder.encode(stripped, task="anchor")).all()
