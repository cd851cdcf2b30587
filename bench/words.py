"""Random prompts of a steerable length for the benchmarks, in words the tiny tokenizer knows whole."""

from __future__ import annotations

import random
from typing import Any

# Words the tiny BPE knows whole (tiny._CORPUS), so a row's length in tokens is easy to steer.
WORDS = ("image", "colour", "answer", "question", "response", "correct", "reasoning", "person", "circle",
         "square", "building", "accurate", "helpful", "detailed", "standing", "picture", "video")


def random_text(tokenizer: Any, rng: random.Random, count: int) -> str:
    """About `count` tokens of random known words."""
    words: list[str] = []
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < count:
        words.append(rng.choice(WORDS))
    return " ".join(words)
