"""The two workloads, from the real data shipped in jobbert_onnx/_data (see its SOURCES.md).

- titles: a seeded mix of en/es/de/zh job titles, encoded with the `anchor` head;
- skill lists: real ESCO skills joined with ", " until a list reaches a target
  length drawn from 40-80 tokens (so most hit the 64-token cap), `positive` head.
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer

from jobbert_onnx import samples


def titles(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pool = [t for language in samples.LANGUAGES for t in samples.titles(language)]
    return rng.sample(pool, min(count, len(pool)))


def skill_lists(count: int, tokenizer_json: Path, seed: int = 0) -> list[str]:
    """Comma-joined ESCO skills, 40-80 tokens each before truncation (counted by the export's tokenizer)."""
    rng = random.Random(seed)
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    pools = {language: samples.skills(language) for language in samples.SKILL_LANGUAGES}
    lists = []
    for _ in range(count):
        pool = pools[rng.choice(samples.SKILL_LANGUAGES)]
        target = rng.randint(40, 80)
        chosen: list[str] = []
        while not chosen or len(tokenizer.encode(", ".join(chosen)).ids) < target:
            chosen.append(rng.choice(pool))
        lists.append(", ".join(chosen))
    return lists
