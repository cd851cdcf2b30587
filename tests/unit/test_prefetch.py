"""Batches made in DataLoader workers (trainer/prefetch.py, data.loaderWorkers): the same batches in the
same order as in the rank's own process, a step that does not wait on media I/O, and errors that keep
their type and the row's file:line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mmalign.api.inputs import DataSource
from mmalign.trainer import collate, data, media, prefetch, tiny
from mmalign.trainer.order import DataOrder


def _pairs(folder: Path, count: int = 12) -> list[data.PreferencePair]:
    """`count` rows of a JSONL file: images of several sizes, every third row a video frame folder."""
    rows = []
    for i in range(count):
        if i % 3 == 2:
            clip = folder / f"clip{i}"
            clip.mkdir()
            for frame in range(2 + i % 5):
                Image.new("RGB", (24 + 2 * i, 20), (20 * frame, 10 * i, 0)).save(clip / f"{frame:03d}.png")
            rows.append(
                {
                    "id": f"q{i}_0",
                    "video": clip.name,
                    "prompt": f"What happens {i}?",
                    "chosen": "It gets redder.",
                    "rejected": "Nothing.",
                }
            )
        else:
            Image.new("RGB", (16 + 8 * (i % 4), 32), (10 * i, 100, 50)).save(folder / f"image{i}.png")
            rows.append(
                {
                    "id": f"q{i}_0",
                    "image": f"image{i}.png",
                    "prompt": f"What colour is {i}?",
                    "chosen": "Green." * (1 + i % 3),
                    "rejected": "Blue.",
                }
            )
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data.read_pairs(DataSource(uri=str(folder / "pairs.jsonl")))[0]


def _made(
    items: Any,
    collator: collate.Collator,
    workers: int,
    build: Any = collate.Collator.pairs,
) -> list[tuple[Any, collate.Batch]]:
    source = DataSource(uri="x.jsonl", loader_workers=workers, prefetch_batches=2)
    with prefetch.Prefetcher.of(items, collator, build, source) as made:
        return [(work.key, batch) for work, batch in made]


def _same(a: collate.Batch, b: collate.Batch) -> None:
    for field in ("input_ids", "attention_mask", "response_mask", "critique_mask", "mm_token_type_ids"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None and y is None) or torch.equal(x, y), field
    assert a.vision.keys() == b.vision.keys()
    assert all(torch.equal(a.vision[k], b.vision[k]) for k in a.vision)


@pytest.mark.parametrize("architecture", ["qwen2-vl", "llava-onevision"])
def test_workers_make_the_in_process_batches_in_the_training_order(tmp_path: Path, architecture: str) -> None:
    pairs = _pairs(tmp_path)
    collator = collate.Collator(tiny.build_processor(architecture), media.MediaLoader(video_frames=4))
    order = DataOrder(len(pairs), micro_batch=2, accumulation=2, world_size=2, seed=3)
    items = prefetch.training_items(order, rank=1, start=1, total=3, pairs=pairs)  # resumed at step 1
    in_process = _made(items, collator, workers=0)
    in_workers = _made(items, collator, workers=2)
    expected = [
        (step, micro, tuple(indices))
        for step in (1, 2)
        for micro, indices in enumerate(order.micro_batches(step, 1))
    ]
    assert [key for key, _ in in_process] == [key for key, _ in in_workers] == expected
    for (_, a), (_, b) in zip(in_process, in_workers, strict=True):
        _same(a, b)
    assert any("pixel_values_videos" in batch.vision for _, batch in in_workers)
    # the reward rows (critique) too, through `take` as the stage's loss_of asks
    source = DataSource(uri="x.jsonl", loader_workers=2)
    with prefetch.Prefetcher.of(items, collator, collate.Collator.reward, source) as made:
        for key, _ in in_process:
            pairs_of = [pairs[i] for i in key[2]]
            _same(made.take(key), collator.reward(pairs_of))
        with pytest.raises(RuntimeError, match="after the last prefetched item"):
            made.take((3, 0, ()))


def test_a_step_does_not_wait_for_slow_media(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading each image takes IO seconds (a slow disk or S3), a step COMPUTE seconds (the model: a
    sleep here, as a GPU step leaves the CPU free): in workers a step costs max(IO, COMPUTE), in the
    rank's process their sum."""
    io, compute, steps = 0.4, 0.4, 6
    pairs = _pairs(tmp_path, count=steps * 2)
    pairs = [p for p in pairs if p.media_kind == "image"][:steps]  # one image per micro-batch of one pair
    opened = media._open_image

    def slow_open(uri: str) -> Any:
        time.sleep(io)
        return opened(uri)

    monkeypatch.setattr(media, "_open_image", slow_open)  # inherited by the forked workers
    collator = collate.Collator(tiny.build_processor("qwen2-vl"), media.MediaLoader())

    def steady(workers: int) -> float:
        """Seconds from the first batch to the last: the steps after the pass started (the first batch
        waits for the workers to start and read, as a stage's first step does)."""
        source = DataSource(uri="x.jsonl", loader_workers=workers, prefetch_batches=2)
        arrived = []
        with prefetch.Prefetcher.of(
            prefetch.blocks(pairs, 1), collator, collate.Collator.pairs, source
        ) as made:
            for _ in made:
                arrived.append(time.monotonic())
                time.sleep(compute)
        return arrived[-1] - arrived[0]

    sequential, overlapped = steady(0), steady(2)
    print(f"{steps - 1} steps: {sequential:.2f}s in the rank's process, {overlapped:.2f}s with 2 workers")
    assert sequential >= (steps - 1) * (io + compute)
    assert overlapped < (steps - 1) * (max(io, compute) + 0.5 * min(io, compute)), (sequential, overlapped)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_missing_image_fails_at_its_step_with_its_row_or_gets_a_placeholder(
    tmp_path: Path, workers: int
) -> None:
    pairs = _pairs(tmp_path)
    (tmp_path / "image4.png").unlink()  # row 5 of pairs.jsonl, the 3rd block of 2
    processor = tiny.build_processor("qwen2-vl")
    made: list[Any] = []
    source = DataSource(uri="x.jsonl", loader_workers=workers)
    with pytest.raises(
        data.DataError, match=r"row 'q4_0' \(.*pairs.jsonl:5\): media not found: .*image4.png"
    ):
        with prefetch.Prefetcher.of(
            prefetch.blocks(pairs, 2),
            collate.Collator(processor, media.MediaLoader()),
            collate.Collator.pairs,
            source,
        ) as batches:
            for work, _ in batches:
                made.append(work.key)
    assert made == [0, 1]  # the blocks before it trained
    with prefetch.Prefetcher.of(
        prefetch.blocks(pairs, 2),
        collate.Collator(processor, media.MediaLoader("placeholder")),
        collate.Collator.pairs,
        source,
    ) as batches:
        assert len(list(batches)) == 6


def test_a_row_too_long_in_a_worker_keeps_its_type_and_fields(tmp_path: Path) -> None:
    pairs = _pairs(tmp_path, count=3)
    collator = collate.Collator(tiny.build_processor("qwen2-vl"), media.MediaLoader(), max_length=16)
    source = DataSource(uri="x.jsonl", loader_workers=1)
    with pytest.raises(collate.RowTooLong) as raised:
        with prefetch.Prefetcher.of(
            prefetch.blocks(pairs, 1), collator, collate.Collator.pairs, source
        ) as batches:
            list(batches)
    assert raised.value.where.startswith("row 'q0_0' (") and raised.value.where.endswith("pairs.jsonl:1)")
    assert raised.value.tokens > 16 and "data.maxLength 16" in str(raised.value)
