"""`builtin://synthetic-shapes`: a controlled multimodal preference task for the paper's two claims.

Each query is a 32x32 image (dark background, seeded pixel noise) holding ONE shape with three details:
its colour (red, green, blue, yellow), its shape (a `block` filling its half of the image, or a
`dot` of 8x8 px) and its side (left or right half). Every one of the 16 combinations appears equally often; a query's prompt asks
what the image shows, in two categories (the media folder): `short` ("What is in the image?" ->
"A red block on the left.") and `long` ("Describe the image." -> "The image shows a red block on
the left side of a dark background.").

Each query has four responses: the correct one and three with 1, 2 and 3 wrong details (which
details, and which wrong values, drawn per query). So a pair's difficulty is graded: a rejected
response with one wrong detail differs from the chosen one in one word, with three in three words,
and a reward model's margin δ should grow with the number of wrong details. Every detail value is
correct for some images and wrong for others: the preference cannot be learned from the text alone.

Critiques carry the reason: the chosen one `Correct: a red block on the left.`, a rejected one names
each wrong detail, `Wrong: the colour is red, not blue; the side is left, not right.`

Layouts (both seeded, deterministic per `?seed=N`, default 0):

* `builtin://synthetic-shapes` (`dpo_pairs`): 3 pairs per query, chosen = the correct response,
  rejected = the 1-, 2- and 3-wrong one. Label noise: exactly round(noise x pairs) pairs, drawn with
  the seed, have chosen and rejected swapped (critiques with them), as an annotator's mistake would;
  `?noise=F`, default 0.1. Every row carries `wrong_details` (1..3) and `label_flipped` (bool), fields
  the reader ignores and the score stage keeps, so a bench can split results by difficulty and noise.
  The held-out split has the same noise: a perfect reward model scores about 1 − noise Acc on it.
* `builtin://synthetic-shapes-ranked` (`ranked`): one row per query with the four responses,
  `score` 3 − wrong details; it expands into the 6 pairs of differently ranked responses. No label
  noise (one swapped rank would flip several pairs).

`?queries=N` (default 144, a multiple of 16 keeps the combinations balanced) sets the size: 432 pairs
by default.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# Few, far-apart values: the tiny model (4 image tokens of 16x16 px) must tell them apart within a CPU
# budget; versions with 14 px circles, squares and triangles stayed at chance (docs/paper.md).
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 80, 230), "yellow": (235, 220, 40)}
SHAPES = ("block", "dot")
SIDES = ("left", "right")
DETAILS = ("colour", "shape", "side")
CATEGORIES = ("short", "long")
DEFAULT_QUERIES = 144
DEFAULT_NOISE = 0.1
SIZE = 32
BACKGROUND = (40, 40, 40)
NAMES = ("synthetic-shapes", "synthetic-shapes-ranked")
VERSION = "s3"  # bump when the generator changes: builtin.dataset_file's cache folder name has it


def _values(detail: str) -> tuple[str, ...]:
    return {"colour": tuple(COLOURS), "shape": SHAPES, "side": SIDES}[detail]


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def describe(category: str, truth: dict[str, str]) -> str:
    shape = f"{truth['colour']} {truth['shape']} on the {truth['side']}"
    if category == "short":
        return f"{_a(shape).capitalize()}."
    return f"The image shows {_a(shape)} side of a dark background."


def prompt_of(category: str) -> str:
    return "What is in the image?" if category == "short" else "Describe the image."


def critique(truth: dict[str, str], said: dict[str, str]) -> str:
    wrong = [d for d in DETAILS if said[d] != truth[d]]
    if not wrong:
        return f"Correct: {_a(truth['colour'])} {truth['shape']} on the {truth['side']}."
    parts = [f"the {d} is {truth[d]}, not {said[d]}" for d in wrong]
    return "Wrong: " + "; ".join(parts) + "."


def queries(seed: int = 0, count: int = DEFAULT_QUERIES) -> list[dict[str, Any]]:
    """Per query: id, category, image path, truth {colour, shape, side}, image jitter, and
    `responses`: four (said details, wrong count) with 0, 1, 2, 3 wrong details. Deterministic per seed."""
    rng = random.Random(f"synthetic-shapes-{seed}")
    combos = [{"colour": c, "shape": s, "side": d} for c in COLOURS for s in SHAPES for d in SIDES]
    out = []
    for index in range(count):
        truth = dict(combos[index % len(combos)])
        # the category alternates within each round of combinations, so it says nothing about them
        category = CATEGORIES[(index + index // len(combos)) % len(CATEGORIES)]
        query_id = f"shapes{index:04d}"
        responses = []
        for wrong_count in range(4):
            said = dict(truth)
            for detail in rng.sample(DETAILS, wrong_count):
                said[detail] = rng.choice([v for v in _values(detail) if v != truth[detail]])
            responses.append((said, wrong_count))
        out.append(
            {
                "id": query_id,
                "category": category,
                "image": f"{category}/{query_id}.png",
                "truth": truth,
                "offset": (rng.randint(0, 3), rng.randint(0, 3)),
                "responses": responses,
            }
        )
    return out


def pair_rows(
    seed: int = 0, count: int = DEFAULT_QUERIES, noise: float = DEFAULT_NOISE
) -> list[dict[str, Any]]:
    """The `dpo_pairs` rows: 3 per query; exactly round(noise x pairs) of them flipped (seeded)."""
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"synthetic-shapes: noise must be in [0, 0.5), got {noise}")
    rows = []
    for query in queries(seed, count):
        category, truth = query["category"], query["truth"]
        correct = query["responses"][0][0]
        for said, wrong_count in query["responses"][1:]:
            rows.append(
                {
                    "id": f"{query['id']}_{wrong_count}",
                    "image": query["image"],
                    "prompt": prompt_of(category),
                    "chosen": describe(category, correct),
                    "rejected": describe(category, said),
                    "chosen_reason": critique(truth, correct),
                    "rejected_reason": critique(truth, said),
                    "wrong_details": wrong_count,
                    "label_flipped": False,
                }
            )
    flipped = random.Random(f"synthetic-shapes-noise-{seed}").sample(
        range(len(rows)), round(noise * len(rows))
    )
    for index in flipped:
        row = rows[index]
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        row["chosen_reason"], row["rejected_reason"] = row["rejected_reason"], row["chosen_reason"]
        row["label_flipped"] = True
    return rows


def ranked_rows(seed: int = 0, count: int = DEFAULT_QUERIES) -> list[dict[str, Any]]:
    """The `ranked` rows: one per query, four responses scored 3 − wrong details."""
    rows = []
    for query in queries(seed, count):
        category, truth = query["category"], query["truth"]
        responses = [
            {
                "text": describe(category, said),
                "score": float(3 - wrong_count),
                "critique": critique(truth, said),
            }
            for said, wrong_count in query["responses"]
        ]
        rows.append(
            {
                "id": query["id"],
                "image": query["image"],
                "prompt": prompt_of(category),
                "responses": responses,
            }
        )
    return rows


def image(truth: dict[str, str], offset: tuple[int, int], key: str) -> Any:
    """The 32x32 RGB image: a block (14x30 px, its whole half) or a dot (8x8 px, moved by `offset`,
    0..3 px) in its half, ±12 pixel noise. Qwen2-VL's tiny processor makes 4 tokens of 16x16 px: a
    block colours both tokens of its half, a dot a corner of one or two."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    left = 0 if truth["side"] == "left" else 16
    colour = COLOURS[truth["colour"]]
    if truth["shape"] == "block":
        draw.rectangle((left + 1, 1, left + 14, 30), fill=colour)
    else:
        x, y = left + 3 + offset[0], 11 + offset[1]
        draw.rectangle((x, y, x + 7, y + 7), fill=colour)
    rng = random.Random(key)
    noisy = bytes(max(0, min(255, v + rng.randint(-12, 12))) for v in picture.tobytes())  # RGB row by row
    return Image.frombytes("RGB", (SIZE, SIZE), noisy)


def export(
    name: str, root: Path, seed: int = 0, count: int = DEFAULT_QUERIES, noise: float = DEFAULT_NOISE
) -> Path:
    """Write `pairs.jsonl` (either layout) and the images into `root`; returns the JSONL path."""
    if name not in NAMES:
        raise ValueError(f"unknown synthetic set {name!r}; known: {', '.join(NAMES)}")
    rows = ranked_rows(seed, count) if name.endswith("-ranked") else pair_rows(seed, count, noise)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    for query in queries(seed, count):
        (root / query["image"]).parent.mkdir(parents=True, exist_ok=True)
        image(query["truth"], query["offset"], f"{seed}-{query['image']}").save(root / query["image"])
    return root / "pairs.jsonl"
