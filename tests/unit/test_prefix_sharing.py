"""Prefix sharing (trainer/prefix.py): one packed sequence per (chosen, rejected) pair gives the plain
path's log-probs and gradients, for every model family, with padding, truncation, mixed image/text
pairs and critique masks; and it really runs the shared prompt once."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from mmalign.trainer import collate, logprobs, models, prefix

CPU = torch.device("cpu")


def _examples(images: bool) -> list[collate.Example]:
    red, blue = Image.new("RGB", (48, 40), (220, 30, 30)), Image.new("RGB", (32, 32), (30, 60, 220))
    return [
        collate.Example(
            "What colour is the image?",
            "The image is red.",
            "It is blue, I think, or green.",
            [red] if images else [],
            "Correct.",
            "Wrong: it is red.",
        ),
        collate.Example(
            "Describe the image in a long sentence, please, with every detail you see.",
            "Blue.",
            "The whole image is filled with a green colour.",
            [blue] if images else [],
            "Right colour.",
            "Wrong colour, and too long.",
        ),
        collate.Example("No image here.", "Fine.", "Not fine at all.", [], "Ok.", "No."),  # a text pair
    ]


def _grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _both(model: Any, batch: collate.Batch, mask: torch.Tensor | None = None) -> tuple[Any, ...]:
    """(plain, shared) summed log-probs and their parameter gradients."""
    out = []
    for sharing in (False, True):
        model.zero_grad()
        layout = prefix.share(batch, logprobs.vision_token_ids(model)) if sharing else None
        hidden = logprobs.forward_hidden(model, batch, layout)
        result = logprobs.sequence_logprobs(model, hidden, batch, mask, chunk_size=4, layout=layout)
        (result.logps * torch.linspace(1, 2, batch.rows)).sum().backward()  # distinct weight per row
        out += [result, _grads(model)]
    return tuple(out)


def _assert_equal(
    plain: Any, plain_grads: dict[str, torch.Tensor], shared: Any, shared_grads: dict[str, torch.Tensor]
) -> None:
    torch.testing.assert_close(shared.logps, plain.logps, rtol=1e-5, atol=1e-4)
    assert shared.tokens.tolist() == plain.tokens.tolist()
    assert set(shared_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        scale = float(grad.abs().max())  # float32 summation-order noise scales with it
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=max(1e-6, 1e-5 * scale))


def test_shared_prompt_pass_equals_the_plain_path_values_and_gradients(family: tuple[str, Any, Any]) -> None:
    """Pairs of different lengths (right padding), a text pair among image pairs."""
    name, model, processor = family
    batch = collate.Collator(processor).pairs(_examples(images=name not in ("tiny-text", "tiny-llama")))
    model.train()
    plain, plain_grads, shared, shared_grads = _both(model, batch)
    _assert_equal(plain, plain_grads, shared, shared_grads)
    if name not in ("tiny-text", "tiny-llama"):
        assert any("visual" in n or "vision_tower" in n for n in shared_grads)  # gradients reach the tower


def test_left_padding_and_critique_masks(family: tuple[str, Any, Any]) -> None:
    """Left-padded rows (generation batches) and reward rows' critique tokens score the same."""
    name, model, processor = family
    collator = collate.Collator(processor)
    examples = _examples(images=name not in ("tiny-text", "tiny-llama"))
    left = collator.generation(examples)
    assert not left.attention_mask[:, 0].all()  # some row really is left-padded
    _assert_equal(*_both(model, left))
    reward = collator.reward(examples, critique=True)
    assert reward.critique_mask is not None
    _assert_equal(*_both(model, reward, reward.critique_mask))


@pytest.mark.parametrize("name", ["tiny-text", "tiny-qwen2-vl"])
def test_truncated_prompts_cut_differently_per_row_share_only_what_is_common(name: str) -> None:
    """max_length cuts the prompt text of the longer row more: the two rows' prompts then differ, the
    shared prefix ends where they do, and the log-probs are still the plain path's."""
    model, processor = models.load_model(f"builtin://{name}")
    words = " ".join(["colour"] * 40)
    example = collate.Example(
        f"Question: {words} ?",
        "Short.",
        "A much longer rejected answer " + words,
        [Image.new("RGB", (32, 32), (10, 200, 10))] if name != "tiny-text" else [],
    )
    full = collate.Collator(processor).pairs([example])
    collator = collate.Collator(processor, max_length=int(full.attention_mask.sum(1).max()) - 10)
    batch = collator.pairs([example])
    chosen, rejected = batch.attention_mask.sum(1).tolist()
    layout = prefix.share(batch)
    prompt_tokens = int((~batch.response_mask[0] & batch.attention_mask[0].bool()).sum())
    assert layout.prefix_lengths[0] < prompt_tokens  # the rows' prompts differ after the cut
    assert layout.input_ids.shape[1] == chosen + rejected - layout.prefix_lengths[0]
    _assert_equal(*_both(model, batch))


def test_the_mask_keeps_the_responses_apart() -> None:
    """Rejected tokens never see chosen tokens; everything sees the prompt; padding sees only itself."""
    _, processor = models.load_model("builtin://tiny-text")
    batch = collate.Collator(processor).pairs(_examples(images=False)[:2])
    layout = prefix.share(batch)
    allowed = layout.allowed()[:, 0]  # (B, S, S)
    segment = layout.segment
    for pair in range(layout.pairs):
        seg = segment[pair]
        rejected, chosen = (seg == prefix.REJECTED).nonzero()[:, 0], (seg == prefix.CHOSEN).nonzero()[:, 0]
        assert not allowed[pair][rejected][:, chosen].any()
        assert allowed[pair][chosen][:, seg == prefix.PREFIX].all()
        assert allowed[pair][rejected][:, seg == prefix.PREFIX].all()
        pads = (seg == prefix.PAD).nonzero()[:, 0]
        assert (allowed[pair][pads].sum(1) == 1).all()


def test_eager_attention_takes_an_additive_mask() -> None:
    model, processor = models.load_model("builtin://tiny-text")
    model.set_attn_implementation("eager")
    try:
        batch = collate.Collator(processor).pairs(_examples(images=False))
        _assert_equal(*_both(model, batch))
    finally:
        model.set_attn_implementation("sdpa")


def test_the_language_model_sees_each_prompt_once() -> None:
    """The decoder's input has one row per pair, holding each pair's image tokens once."""
    model, processor = models.load_model("builtin://tiny-qwen2-vl")
    batch = collate.Collator(processor).pairs(_examples(images=True)[:2])
    seen: list[torch.Size] = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape), with_kwargs=True
    )
    try:
        with torch.no_grad():
            logprobs.policy_logprobs(model, batch, prefix_sharing=True)
    finally:
        handle.remove()
    layout = prefix.share(batch)
    assert seen == [torch.Size((2, layout.input_ids.shape[1], model.config.text_config.hidden_size))]
    image = model.config.image_token_id
    assert ((layout.input_ids == image).sum(1) == (batch.input_ids[:2] == image).sum(1)).all()
    total_plain = int(batch.attention_mask.sum())
    assert int((layout.segment != prefix.PAD).sum()) == total_plain - sum(layout.prefix_lengths)


def test_the_dpo_stage_shares_by_default_and_can_turn_it_off() -> None:
    from mmalign.api.stages import DpoStage
    from mmalign.trainer.stages.dpo import SequenceLogps

    assert DpoStage().prefix_sharing is True
    assert DpoStage.model_validate({"prefixSharing": False}).prefix_sharing is False
    model, processor = models.load_model("builtin://tiny-qwen2-vl")
    batch = collate.Collator(processor).pairs(_examples(images=True))
    with torch.no_grad():
        shared, tokens = SequenceLogps(model)(batch)
        plain, plain_tokens = SequenceLogps(model, prefix_sharing=False)(batch)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-4)
    assert tokens.tolist() == plain_tokens.tolist()


def test_an_attention_kernel_without_masks_is_refused_with_the_switch_named() -> None:
    from types import SimpleNamespace

    _, processor = models.load_model("builtin://tiny-text")
    layout = prefix.share(collate.Collator(processor).pairs(_examples(images=False)))
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="stages.dpo.prefixSharing: false"):
        logprobs._attention_mask(flash, layout, torch.float32)
