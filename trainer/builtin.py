"""`builtin://` URIs: tiny random-init models and a synthetic preference set, with no download.

Models (random weights, see tiny.py): `builtin://tiny-qwen2-vl`, `builtin://tiny-qwen2.5-vl`,
`builtin://tiny-llava-onevision`, `builtin://tiny-text` (~200k parameters, CPU tests), and
`builtin://random-qwen2-vl-0.5b` (also `-qwen2.5-vl-`, `-llava-onevision-`, `-text-`): ~0.5B parameters
for GPU smoke runs. An optional `?seed=N` picks other weights. Each is a real Hugging Face folder, written
once into the cache (`model_folder`) and loaded by models.load_model exactly as a user's folder is.

Dataset `builtin://synthetic-colors`: 96 queries, each a 32x32 image filled with one of 8 colours (with
seeded pixel noise so no two images are equal) and a question about its colour, in three categories:
`short` ("What colour is the image?"), `long` ("Describe the image."), `mcq` (four lettered choices),
32 queries each; every colour appears in every category.
Each query has 3 pairs: the chosen response names the image's colour, each rejected one names a wrong
colour; both carry the same annotated critique, what the image shows and no verdict ("The image is
red.", mcq: "The image is red: B."). Every colour name is chosen for some images and rejected for
others, so the preference cannot be learned from the text alone: it depends on the image.
288 pairs in the `dpo_pairs` layout, images under `<category>/<query>.png`; generated once into a cache
folder (`$MMALIGN_CACHE`, default ~/.cache/mmalign) and read like any JSONL file.

    python -m mmalign.trainer.builtin export synthetic-colors ./colors   # JSONL + images, e.g. for S3

Datasets `builtin://synthetic-shapes` and `builtin://synthetic-shapes-ranked` (synthetic.py): the
controlled task of docs/paper.md — one coloured shape per image, responses with 0-3 wrong details
(graded difficulty), critiques naming each wrong detail, 10% flipped pairs (`?noise=`), `?queries=`
for the size, the ranked multi-response layout for the second name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from mmalign.api import keys
from mmalign.trainer import synthetic

MODELS = {  # name -> (architecture, size preset in tiny.SIZES)
    "tiny-qwen2-vl": ("qwen2-vl", "tiny"),
    "tiny-qwen2.5-vl": ("qwen2.5-vl", "tiny"),
    "tiny-llava-onevision": ("llava-onevision", "tiny"),
    "tiny-text": ("text", "tiny"),
    # ~0.5B random-init models for GPU smoke runs (time, memory, ZeRO-3); they learn nothing real.
    "random-qwen2-vl-0.5b": ("qwen2-vl", "0.5b"),
    "random-qwen2.5-vl-0.5b": ("qwen2.5-vl", "0.5b"),
    "random-llava-onevision-0.5b": ("llava-onevision", "0.5b"),
    "random-text-0.5b": ("text", "0.5b"),
}
DATASETS = ("synthetic-colors", "synthetic-shapes", "synthetic-shapes-ranked")
_DATASET_VERSION = "v3"  # bump when the generator changes: the cache folder name includes it

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "purple": (130, 40, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
QUERIES_PER_COLOUR = 12
PAIRS_PER_QUERY = 3
CATEGORIES = ("short", "long", "mcq")


def parse(uri: str) -> tuple[str, dict[str, str]]:
    """`builtin://name?seed=3` -> ("name", {"seed": "3"}); ValueError for an unknown name."""
    parsed = urlparse(uri)
    if parsed.scheme != "builtin":
        raise ValueError(f"{uri}: not a builtin:// URI")
    name = parsed.netloc + parsed.path.rstrip("/")
    if name not in MODELS and name not in DATASETS:
        known = ", ".join(f"builtin://{n}" for n in (*MODELS, *DATASETS))
        raise ValueError(f"{uri}: unknown built-in; known: {known}")
    return name, {k: v[-1] for k, v in parse_qs(parsed.query).items()}


def is_builtin(uri: str) -> bool:
    return uri.startswith("builtin://")


# ------------------------------------------------------------------------------------------ models


def model_folder(uri: str, seed: int | None = None) -> Path:
    """The Hugging Face folder of a builtin model, written once into the cache with `save_pretrained`
    (config.json, model.safetensors, tokenizer/processor files, chat_template) and then loaded like any
    user's folder (models.load_model). Seed: the URI's `?seed=`, else the `seed` argument (the job's
    seed), else 0.

    Concurrent ranks are safe, as for the dataset: each writes into a temporary folder and renames it."""
    from mmalign.trainer import tiny

    name, options = parse(uri)
    if name not in MODELS:
        raise ValueError(f"{uri} is a dataset, not a model")
    chosen_seed = int(options["seed"]) if "seed" in options else (seed or 0)
    target = cache_dir() / "builtin" / f"{name}-{tiny.FOLDER_VERSION}-seed{chosen_seed}"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        architecture, size = MODELS[name]
        tiny.save_tiny(architecture, scratch, seed=chosen_seed, size=size)
        try:
            os.rename(scratch, target)
        except OSError:  # another process finished first
            shutil.rmtree(scratch, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------ dataset


def _rows(seed: int = 0) -> list[tuple[dict[str, Any], str, tuple[int, int, int]]]:
    """(row, image path, colour) for every pair; deterministic for a seed."""
    rng = random.Random(f"synthetic-colors-{seed}")
    names = list(COLOURS)
    out = []
    query = 0
    for repeat in range(QUERIES_PER_COLOUR):
        for colour_index, colour in enumerate(names):
            # every colour appears in every category (4 queries each), so category says nothing
            category = CATEGORIES[(colour_index + repeat) % len(CATEGORIES)]
            query_id = f"colors{query:04d}"
            path = f"{category}/{query_id}.png"
            wrong = rng.sample([n for n in names if n != colour], PAIRS_PER_QUERY)
            for pair_index, other in enumerate(wrong):
                prompt, chosen, rejected = _texts(category, colour, other, rng)
                row = {
                    "id": f"{query_id}_{pair_index}",
                    "image": path,
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_reason": _critique(category, colour, chosen),
                    "rejected_reason": _critique(category, colour, chosen),
                }
                out.append((row, path, COLOURS[colour]))
            query += 1
    return out


def _critique(category: str, colour: str, right_answer: str) -> str:
    """The annotated critique of either response: what the image shows (for mcq, which choice that
    is), with no verdict. The same text for chosen and rejected, so the score head cannot read the
    label from a teacher-forced critique: it has to compare the critique with the response, which is
    what it does at inference on a critique it generated (docs/paper.md, "The demo's reward model")."""
    if category == "mcq":
        return f"The image is {colour}: {right_answer.removeprefix('Answer: ')}."
    return f"The image is {colour}."


def _texts(category: str, colour: str, other: str, rng: random.Random) -> tuple[str, str, str]:
    if category == "short":
        return "What colour is the image?", f"The image is {colour}.", f"The image is {other}."
    if category == "long":
        return (
            "Describe the image.",
            f"The whole image is filled with a {colour} colour.",
            f"The whole image is filled with a {other} colour.",
        )
    options = [colour, other, *rng.sample([n for n in COLOURS if n not in (colour, other)], 2)]
    rng.shuffle(options)
    letters = "ABCD"
    choices = "\n".join(f"{letter}: {name}" for letter, name in zip(letters, options, strict=True))
    prompt = f"Which colour is the image?\nChoices:\n{choices}"
    return (prompt, f"Answer: {letters[options.index(colour)]}", f"Answer: {letters[options.index(other)]}")


def _image(colour: tuple[int, int, int], key: str) -> Any:
    """A 32x32 image of `colour` with ±12 seeded noise per pixel."""
    from PIL import Image

    rng = random.Random(key)
    pixels = [tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in colour) for _ in range(32 * 32)]
    image = Image.new("RGB", (32, 32))
    image.putdata(pixels)
    return image


def export_dataset(
    name: str, folder: str | os.PathLike[str], seed: int = 0, options: dict[str, str] | None = None
) -> Path:
    """Write `pairs.jsonl` and the images into `folder`; returns the JSONL path. `options`: the URI's
    `queries` and `noise` for the synthetic-shapes sets (ValueError naming a bad one)."""
    if name.startswith("builtin://"):
        name, options = parse(name)
        seed = int(options.get("seed", seed))
    if name not in DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; known: {', '.join(DATASETS)}")
    root = Path(folder)
    if name in synthetic.NAMES:
        return synthetic.export(name, root, seed, **_shape_options(name, options or {}))
    root.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as f:
        for row, path, colour in _rows(seed):
            f.write(json.dumps(row) + "\n")
            if path not in written:
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                _image(colour, f"{seed}-{path}").save(root / path)
                written.add(path)
    return root / "pairs.jsonl"


def _shape_options(name: str, options: dict[str, str]) -> dict[str, Any]:
    unknown = sorted(set(options) - {"seed", "queries", "noise"})
    if unknown:
        raise ValueError(f"builtin://{name}: unknown option {unknown[0]!r}; known: seed, queries, noise")
    try:
        out: dict[str, Any] = {
            "count": int(options.get("queries", synthetic.DEFAULT_QUERIES)),
            "noise": float(options.get("noise", synthetic.DEFAULT_NOISE)),
        }
    except ValueError as error:
        raise ValueError(f"builtin://{name}: queries must be an integer, noise a number ({error})") from None
    if out["count"] < 1:
        raise ValueError(f"builtin://{name}: queries must be >= 1, got {out['count']}")
    return out


def cache_dir() -> Path:
    return Path(os.environ.get(keys.ENV_CACHE) or Path.home() / ".cache" / "mmalign")


def dataset_file(uri: str) -> str:
    """The local JSONL path of a builtin dataset, generated into the cache on first use.

    Concurrent ranks are safe: each writes into its own temporary folder and renames it into place;
    the first rename wins and the others discard their copy."""
    name, options = parse(uri)
    if name not in DATASETS:
        raise ValueError(f"{uri} is a model, not a dataset")
    seed = int(options.get("seed", 0))
    folder = f"{name}-{_DATASET_VERSION}-seed{seed}"
    if name in synthetic.NAMES:
        shape = _shape_options(name, options)
        folder = f"{name}-{synthetic.VERSION}-seed{seed}-q{shape['count']}" + (
            "" if name.endswith("-ranked") else f"-n{shape['noise']:g}"
        )
    target = cache_dir() / "builtin" / folder
    if not (target / "pairs.jsonl").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        export_dataset(name, scratch, seed, options)
        try:
            os.rename(scratch, target)
        except OSError:  # another process finished first
            shutil.rmtree(scratch, ignore_errors=True)
    return str(target / "pairs.jsonl")


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "export":
        print("usage: python -m mmalign.trainer.builtin export DATASET FOLDER", file=sys.stderr)
        return 2
    print(export_dataset(argv[1], argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
