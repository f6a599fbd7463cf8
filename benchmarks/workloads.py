"""The two workloads, from the real data shipped in jobbert_onnx/_data (see its SOURCES.md).

- titles: a seeded mix of en/es/de/zh job titles, encoded with the `anchor` head
  (beyond the 7,155 shipped titles, titles repeat);
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
    if count <= len(pool):
        return rng.sample(pool, count)
    return rng.sample(pool, len(pool)) + rng.choices(pool, k=count - len(pool))


def skill_lists(count: int, tokenizer_json: Path, seed: int = 0) -> list[str]:
    """Comma-joined ESCO skills, 40-80 tokens each before truncation (counted by the export's tokenizer).

    A list's length is the sum of its skills' token counts, the separators' and the
    two special tokens (each skill is tokenized once, so 50,000 lists take seconds).
    """
    rng = random.Random(seed)
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.no_truncation()
    tokenizer.no_padding()

    def size(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    separator = size("Koch, Kellner") - size("Koch") - size("Kellner")  # ", " between two skills
    pools = {}
    for language in samples.SKILL_LANGUAGES:
        skills = samples.skills(language)
        sizes = [len(e.ids) for e in tokenizer.encode_batch(skills, add_special_tokens=False)]
        pools[language] = list(zip(skills, sizes, strict=True))
    lists = []
    for _ in range(count):
        pool = pools[rng.choice(samples.SKILL_LANGUAGES)]
        target = rng.randint(40, 80)
        chosen: list[str] = []
        tokens = 2 - separator
        while not chosen or tokens < target:
            skill, size = rng.choice(pool)
            chosen.append(skill)
            tokens += size + separator
        lists.append(", ".join(chosen))
    return lists
