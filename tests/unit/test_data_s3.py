"""Data, media and models from a real S3 server (SeaweedFS weed mini): what a cluster job reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from mmalign.api.inputs import DataSource
from mmalign.trainer import builtin, collate, data, logprobs, media, models, prefetch, tiny, transfer


def test_pairs_and_images_stream_from_s3(bucket: str, tmp_path: Path) -> None:
    folder = tmp_path / "colors"
    builtin.export_dataset("synthetic-colors", folder)
    transfer.upload_folder(folder, f"{bucket}/colors/")
    pairs, stats = data.read_pairs(f"{bucket}/colors/pairs.jsonl")
    local, _ = data.read_pairs(str(folder / "pairs.jsonl"))
    assert [p.fields for p in pairs] == [p.fields for p in local] and stats.skipped == 0
    assert pairs[0].media_base == f"{bucket}/colors/"
    image = media.MediaLoader().load(pairs[0])[0]
    assert image.tobytes() == media.MediaLoader().load(local[0])[0].tobytes()

    with pytest.raises(data.DataError, match=f"{bucket}/elsewhere/short/colors0000.png"):
        media.MediaLoader().load(data.read_pairs(DataSource(uri=f"{bucket}/colors/pairs.jsonl",
                                                           media_uri=f"{bucket}/elsewhere/"))[0][0])
    with pytest.raises(data.DataError, match="no such file"):
        data.read_pairs(f"{bucket}/colors/missing.jsonl")


def test_loader_workers_read_images_from_s3_with_their_own_client(bucket: str, tmp_path: Path) -> None:
    """DataLoader workers (trainer/prefetch.py) fork after this process built its S3 client (reading
    the pairs); each drops it and builds its own, and their batches equal the in-process ones."""
    folder = tmp_path / "colors"
    builtin.export_dataset("synthetic-colors", folder)
    transfer.upload_folder(folder, f"{bucket}/workers/")
    pairs = data.read_pairs(f"{bucket}/workers/pairs.jsonl")[0][:8]
    collator = collate.Collator(tiny.build_processor("qwen2-vl"), media.MediaLoader())
    made = {}
    for workers in (0, 2):
        source = DataSource(uri="x.jsonl", loader_workers=workers)
        with prefetch.Prefetcher.of(prefetch.blocks(pairs, 2), collator, collate.Collator.pairs, source) as batches:
            made[workers] = [batch for _, batch in batches]
    assert len(made[2]) == 4
    for a, b in zip(made[0], made[2], strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.vision["pixel_values"], b.vision["pixel_values"])


def test_video_frames_from_an_s3_prefix(bucket: str, tmp_path: Path) -> None:
    for i in range(10):
        Image.new("RGB", (4, 4), (i * 10, 0, 0)).save(tmp_path / f"{i:02d}.jpg", quality=100)
        transfer.upload_file(tmp_path / f"{i:02d}.jpg", f"{bucket}/videos/clip/{i:02d}.jpg")
    row = data.pairs_from_row({"id": "v_1", "video": "clip", "prompt": "p", "chosen": "c", "rejected": "r"}, "x:1")[0]
    row.media_base = f"{bucket}/videos/"
    frames = media.MediaLoader(video_frames=2).load(row)
    assert [round(f.getpixel((0, 0))[0], -1) for f in frames] == [20, 70]


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-llava-onevision", "tiny-text"])
def test_model_from_an_s3_prefix_downloads_once(bucket: str, tmp_path: Path, name: str) -> None:
    """A Hugging Face folder as save_pretrained writes it (the builtin's own folder: config, safetensors,
    tokenizer/processor files, chat template) in S3 loads through the same path, for every family."""
    model, processor = models.load_model(f"builtin://{name}")
    transfer.upload_folder(models.model_dir(f"builtin://{name}"), f"{bucket}/models/{name}/")
    cache = tmp_path / "cache"
    again, processor2 = models.load_model(f"{bucket}/models/{name}/", cache_dir=cache)
    assert len(list(cache.iterdir())) == 2  # the model folder and its lock file
    assert processor.chat_template and processor2.chat_template == processor.chat_template
    images = [] if name == "tiny-text" else [Image.new("RGB", (32, 32), (220, 30, 30))]
    batch = collate.Collator(processor2).pairs([collate.Example("What colour?", "Red.", "Blue.", images)])
    with torch.no_grad():
        torch.testing.assert_close(logprobs.policy_logprobs(again, batch).logps,
                                   logprobs.policy_logprobs(model, batch).logps, rtol=0, atol=0)
    marker = next(p for p in cache.iterdir() if p.is_dir()) / ".complete"
    stamp = marker.stat().st_mtime_ns
    models.load_model(f"{bucket}/models/{name}/", cache_dir=cache)
    assert marker.stat().st_mtime_ns == stamp  # second load reused the download
