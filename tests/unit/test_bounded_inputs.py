"""Bounded inputs: image resolution limits, video as the model's own video input, the truncation
policy (the response and the image tokens are never cut) and the per-row token count check."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mmalign.api.inputs import DataSource
from mmalign.trainer import collate, data, logprobs, media, tiny

RED = (200, 20, 20)


def image_tokens(batch: collate.Batch, token: str, tokenizer: Any) -> int:
    return int((batch.input_ids[0] == tokenizer.convert_tokens_to_ids(token)).sum())


def test_qwen_image_tokens_follow_min_and_max_pixels() -> None:
    processor = tiny.build_processor("qwen2-vl")  # patch 8, merge 2: one token per 16 x 16 = 256 px
    big = [collate.Example("What colour?", "Red.", "Blue.", [Image.new("RGB", (640, 480), RED)])]
    tokens = {}
    for limit in (16, 64):
        collator = collate.Collator(processor, max_pixels=256 * limit, min_pixels=256)
        tokens[limit] = image_tokens(collator.pairs(big), tiny.QWEN_IMAGE, collator.tokenizer)
        assert tokens[limit] <= limit
    assert tokens[16] < tokens[64]
    small = [collate.Example("What colour?", "Red.", "Blue.", [Image.new("RGB", (16, 16), RED)])]
    collator = collate.Collator(processor, min_pixels=256 * 16, max_pixels=256 * 64)
    assert image_tokens(collator.pairs(small), tiny.QWEN_IMAGE, collator.tokenizer) >= 16  # scaled up


def test_images_above_max_pixels_are_scaled_down_aspect_kept() -> None:
    image = Image.new("RGB", (1000, 500), RED)
    fitted = media.fit_pixels(image, 20_000)
    assert fitted.size[0] * fitted.size[1] <= 20_000 and abs(fitted.size[0] / fitted.size[1] - 2) < 0.05
    assert media.fit_pixels(image, None) is image and media.fit_pixels(image, 10**6) is image
    # LLaVA-OneVision: the processor sees the scaled image (its anyres grid is chosen from this size)
    collator = collate.Collator(tiny.build_processor("llava-onevision"), max_pixels=20_000)
    batch = collator.pairs([collate.Example("What colour?", "Red.", "Blue.", [image])])
    height, width = batch.vision["image_sizes"][0].tolist()
    assert height * width <= 20_000 and width > height


def test_qwen_videos_are_the_models_video_input_and_match_the_reference_forward() -> None:
    model, processor = tiny.build_tiny("qwen2-vl")
    frames = [Image.new("RGB", (32, 32), (30 * i, 20, 20)) for i in range(4)]
    items = [
        collate.Example("Describe the video.", "It gets redder.", "Blue.", video=frames),
        collate.Example("What colour?", "Red.", "Blue.", [frames[0]]),
    ]
    batch = collate.Collator(processor).pairs(items)
    assert {"pixel_values_videos", "video_grid_thw", "pixel_values", "image_grid_thw"} <= set(batch.vision)
    assert batch.vision["video_grid_thw"].tolist() == [[2, 4, 4]]  # 4 frames -> 2 temporal patches
    video_id = processor.tokenizer.convert_tokens_to_ids(tiny.QWEN_VIDEO)
    assert int((batch.input_ids[0] == video_id).sum()) == 2 * 4 * 4 // 4  # merge 2 x 2
    assert batch.mm_token_type_ids is not None
    assert torch.equal(batch.mm_token_type_ids == 2, batch.input_ids == video_id)
    with torch.no_grad():
        fast = logprobs.policy_logprobs(model, batch).logps.double()  # vision once per pair
        naive = logprobs.naive_sequence_logprobs(
            model(**batch.model_inputs()).logits, batch.input_ids, batch.response_mask
        )
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-4)


def _frame_folder(folder: Path, frames: int) -> str:
    folder.mkdir()
    for i in range(frames):
        Image.new("RGB", (48, 36), (20 * i, 200 - 10 * i, 30)).save(folder / f"{i:05d}.png")
    return folder.name


def test_llava_onevision_videos_are_its_video_input_bounded_and_train(tmp_path: Path) -> None:
    """The builtin tiny LLaVA-OneVision (its save_pretrained folder, loaded as a user's): a frame folder
    is ONE <video> of exactly data.videoFrames frames (fewer frames repeat, more are sampled), each
    pooled 2x2 — videoFrames x ceil(sqrt(N) / 2)^2 + 1 tokens whatever the folder holds — through the
    processor's `videos=`; the stage's log-prob paths equal HF's own forward, and a video pair trains
    (the vision tower and projector get gradients, the DPO loss falls)."""
    from mmalign.trainer import losses, models

    model, processor = models.load_model("builtin://tiny-llava-onevision")
    frames = 4
    pairs = [
        data.PreferencePair(
            id=f"v_{n}",
            uid=f"pairs.jsonl:{n}",
            query_id=f"v{n}",
            category="video",
            prompt="What happens?",
            chosen="It turns red.",
            rejected="It stays blue.",
            media=[_frame_folder(tmp_path / f"clip{n}", n)],
            media_kind="video",
            media_base=str(tmp_path),
        )
        for n in (3, 11)  # fewer and more frames than videoFrames
    ]
    image_pair = data.PreferencePair(
        id="i_1",
        uid="pairs.jsonl:20",
        query_id="i",
        category="image",
        prompt="What colour?",
        chosen="Red.",
        rejected="Blue.",
        media=["clip3/00000.png"],
        media_kind="image",
        media_base=str(tmp_path),
    )
    collator = collate.Collator(processor, media.MediaLoader(video_frames=frames))
    batch = collator.pairs([*pairs, image_pair])
    assert batch.vision["pixel_values_videos"].shape[:2] == (2, frames)  # (videos, frames, C, H, W)
    video_id = processor.tokenizer.convert_tokens_to_ids(tiny.LLAVA_VIDEO)
    per_frame = math.ceil(math.isqrt(processor.num_image_tokens) / 2) ** 2  # 4 x 4 patches -> 2 x 2
    video_tokens = frames * per_frame + 1  # + 1 newline
    assert (batch.input_ids == video_id).sum(dim=1).tolist() == [
        video_tokens,
        video_tokens,
        0,
    ] * 2  # chosen, rejected
    image_id = processor.tokenizer.convert_tokens_to_ids(tiny.LLAVA_IMAGE)
    assert [int((row == image_id).sum()) > 0 for row in batch.input_ids] == [False, False, True] * 2
    with torch.no_grad():
        naive = logprobs.naive_sequence_logprobs(
            model(**batch.model_inputs()).logits, batch.input_ids, batch.response_mask
        )
        for shared in (False, True):
            fast = logprobs.policy_logprobs(model, batch, prefix_sharing=shared).logps.double()
            torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-4)

    video_batch = collator.pairs(pairs)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = losses.DpoLoss("mm-dpo", beta=0.1)
    reference_chosen, reference_rejected = video_batch.split(
        logprobs.policy_logprobs(model, video_batch).logps.detach()
    )
    trajectory = []
    for _ in range(4):
        chosen, rejected = video_batch.split(
            logprobs.policy_logprobs(model, video_batch, prefix_sharing=True).logps
        )
        loss, _ = loss_fn(
            losses.DpoInputs(
                policy_chosen=chosen,
                policy_rejected=rejected,
                reference_chosen=reference_chosen,
                reference_rejected=reference_rejected,
            )
        )
        optimizer.zero_grad()
        loss.backward()
        towers = {
            name: p.grad
            for name, p in model.named_parameters()
            if "vision_tower" in name or "multi_modal_projector" in name
        }
        assert any(g is not None and float(g.abs().sum()) > 0 for g in towers.values())
        optimizer.step()
        trajectory.append(float(loss.detach()))
    assert trajectory[-1] < trajectory[0], trajectory


def test_a_video_pair_loads_as_the_examples_video(tmp_path: Path) -> None:
    folder = tmp_path / "clip"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(folder / f"{i:05d}.png")
    pair = data.PreferencePair(
        id="v1",
        uid="pairs.jsonl:3",
        query_id="v",
        category="c",
        prompt="Describe.",
        chosen="Red.",
        rejected="Blue.",
        media=["clip"],
        media_kind="video",
        media_base=str(tmp_path),
    )
    example = collate.Collator(tiny.build_processor("qwen2-vl"), media.MediaLoader(video_frames=4)).examples(
        [pair]
    )[0]
    assert len(example.video) == 4 and example.images == [] and example.where == "row 'v1' (pairs.jsonl:3)"


def long_example(words: int) -> collate.Example:
    prompt = "Context: " + "the image is red " * words + "Question: what colour is the image?"
    return collate.Example(
        prompt,
        "The image is red.",
        "It is blue.",
        [Image.new("RGB", (32, 32), RED)],
        "Right colour, " * 20 + "correct.",
        "Wrong.",
    )


@pytest.mark.parametrize("name", ["qwen2-vl", "llava-onevision", "text"])
def test_truncation_cuts_critique_then_prompt_text_never_response_or_image_tokens(name: str) -> None:
    processor = tiny.build_processor(name)
    item = [long_example(40)]
    full = collate.Collator(processor, max_length=4096)
    whole = full.reward(item)
    length = int(whole.attention_mask[0].sum())
    critique = int(whole.critique_mask[0].sum())  # type: ignore[index]
    tokenizer = full.tokenizer
    image = tiny.QWEN_IMAGE if name != "llava-onevision" else tiny.LLAVA_IMAGE

    cut = collate.Collator(processor, max_length=length - critique + 2).reward(item)  # critique cut first
    assert int(cut.critique_mask[0].sum()) == 2  # type: ignore[index]
    assert torch.equal(cut.input_ids[0][cut.response_mask[0]], whole.input_ids[0][whole.response_mask[0]])

    pairs_full = full.pairs(item)
    prompt_length = int((pairs_full.attention_mask[0].bool() & ~pairs_full.response_mask[0]).sum())
    budget = prompt_length + int(pairs_full.response_mask[0].sum()) - 30
    cut = collate.Collator(processor, max_length=budget).pairs(item)  # 30 prompt-text tokens go
    assert int(cut.attention_mask[0].sum()) == budget
    assert torch.equal(
        cut.input_ids[0][cut.response_mask[0]], pairs_full.input_ids[0][pairs_full.response_mask[0]]
    )
    text = tokenizer.decode(cut.input_ids[0][cut.attention_mask[0].bool()])
    assert "Question: what colour is the image?" in text and "Context:" not in text  # cut from its start
    assert image_tokens(cut, image, tokenizer) == image_tokens(pairs_full, image, tokenizer)
    assert text.startswith(tokenizer.decode(pairs_full.input_ids[0][:3]))  # the template's head stays


def test_a_row_that_cannot_fit_names_its_file_and_line_or_is_skipped(tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), RED).save(tmp_path / "red.png")

    def pair(line: int, chosen: str) -> data.PreferencePair:
        return data.PreferencePair(
            id=f"q_{line}",
            uid=f"pairs.jsonl:{line}",
            query_id="q",
            category="c",
            prompt="What colour?",
            chosen=chosen,
            rejected="Blue.",
            media=["red.png"],
            media_kind="image",
            media_base=str(tmp_path),
        )

    pairs = [pair(1, "Red."), pair(2, "Red. " * 60), pair(3, "Red, clearly.")]
    collator = collate.Collator(tiny.build_processor("qwen2-vl"), media.MediaLoader(), max_length=64)
    with pytest.raises(
        collate.RowTooLong,
        match=r"row 'q_2' \(pairs\.jsonl:2\): \d+ tokens .* data\.maxLength 64 "
        r".*remove this row",
    ) as error:
        collator.pairs(pairs)
    assert error.value.exit_code == data.DataError.exit_code
    kept, skipped = collator.keep_fitting(pairs)
    assert [p.uid for p in kept] == ["pairs.jsonl:1", "pairs.jsonl:3"]
    assert len(skipped) == 1 and re.fullmatch(r"row 'q_2' \(pairs\.jsonl:2\): \d+ tokens", skipped[0])
    assert collator.pairs(kept).rows == 4


def test_spec_fields_for_bounded_inputs() -> None:
    source = DataSource.model_validate({"uri": "x.jsonl", "maxPixels": 1003520, "minPixels": 3136})
    assert (source.max_pixels, source.min_pixels) == (1003520, 3136)
    with pytest.raises(ValueError, match="minPixels must not exceed data.maxPixels"):
        DataSource.model_validate({"uri": "x.jsonl", "maxPixels": 3136, "minPixels": 1003520})


def test_a_batch_of_pairs_loads_its_media_in_threads_in_order(tmp_path: Path) -> None:
    def pair(i: int, path: str) -> data.PreferencePair:
        return data.PreferencePair(
            id=f"q_{i}",
            uid=f"pairs.jsonl:{i}",
            query_id="q",
            category="c",
            prompt="?",
            chosen="a",
            rejected="b",
            media=[path],
            media_kind="image",
            media_base=str(tmp_path),
        )

    for i in range(12):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    pairs = [pair(i, f"{i}.png") for i in range(12)]
    loaded = media.MediaLoader(threads=4).load_many(pairs)
    assert [images[0].getpixel((0, 0))[0] for images in loaded] == list(range(12))
    missing = [*pairs, pair(12, "gone.png"), pair(13, "gone.png")]
    with pytest.raises(data.DataError, match=r"q_12"):
        media.MediaLoader(threads=4).load_many(missing)
    loader = media.MediaLoader(missing="placeholder", threads=4)
    loader.load_many(missing)
    assert loader.placeholders == 2 and sorted(loader.placeholder_rows) == [
        "pairs.jsonl:12",
        "pairs.jsonl:13",
    ]
