"""The export's tokenizer gives the ids and truncation of transformers' tokenizer on the source folder."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import parity_texts
from tokenizers import Tokenizer

from jobbert_onnx import samples
from jobbert_onnx.export.toy_tokenizer import XLMR_VOCAB_SIZE


def _texts() -> list[str]:
    long_title = " ".join(samples.titles("de")[:40])
    return [*parity_texts(), long_title, "Ünïcode ｆｕｌｌwidth", "tab\tand\nnewline", "  leading and trailing  "]


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


def test_cap_is_max_seq_length_not_the_source_files_128(tiny_models: dict[str, Path], tiny_exports: dict) -> None:
    source = json.loads((tiny_models["router"] / "tokenizer.json").read_text())
    assert source["truncation"]["max_length"] == 128, "the fixture keeps the trap of the real files"
    exported = json.loads((tiny_exports[("router", "fp32")] / "tokenizer.json").read_text())
    assert exported["truncation"]["max_length"] == 64
    assert exported["padding"]["direction"] == "Right"
    assert exported["padding"]["pad_id"] == 1


def test_stand_in_tokenizer_has_the_xlmr_shape(tiny_models: dict[str, Path]) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_models["router"] / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == XLMR_VOCAB_SIZE == 250_002
    ids = {t: tokenizer.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")}
    assert ids == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 250_001}
    doc = json.loads(tokenizer.to_str())
    assert doc["model"]["type"] == "Unigram"
    assert "Metaspace" in json.dumps(doc["pre_tokenizer"])
    encoded = tokenizer.encode("Software Engineer")
    assert encoded.ids[0] == 0 and encoded.ids[-1] == 2
    assert encoded.tokens[1].startswith("▁")
