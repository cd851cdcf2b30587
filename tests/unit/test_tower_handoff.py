"""The frozen vision tower's output handed from the policy's pass to the reference's (logprobs.TowerHandoff,
stages/dpo.py tower_handoff): the reference then runs only its own projector, and its log-probs are the
ones of its own full pass, for Qwen2-VL and Qwen2.5-VL (window order), plain, prefix-shared and packed
batches; the handoff is refused wherever reusing the tower output would not be exact."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from mmalign.trainer import adapters, collate, logprobs, models
from mmalign.trainer.stages import dpo

MODES = {"plain": (False, False), "prefix-shared": (True, False), "packed": (True, True)}


def _pair(name: str) -> tuple[Any, Any, Any]:
    """(policy with a frozen tower, reference: the same checkpoint, processor). Qwen2.5-VL gets 32 px
    windows over 64 px images, so its blocks really run in a permuted window order (the tiny preset's
    16 px windows hold one merged token each: the identity order)."""
    policy, processor = models.load_model(f"builtin://{name}")
    reference, _ = models.load_model(f"builtin://{name}")
    if name == "tiny-qwen2.5-vl":
        for model in (policy, reference):
            model.model.visual.window_size = 32
        processor.image_processor.size = {"shortest_edge": 64 * 64, "longest_edge": 64 * 64}
    adapters.prepare(policy, freeze_vision_tower=True, lora=None, seed=0, field="stages.dpo")
    reference.requires_grad_(False).eval()
    return policy, reference, processor


def _batch(processor: Any) -> collate.Batch:
    red, blue = Image.new("RGB", (48, 40), (220, 30, 30)), Image.new("RGB", (64, 64), (30, 60, 220))
    noise = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    return collate.Collator(processor).pairs(
        [
            collate.Example("What colour is the image?", "The image is red.", "It is blue, or green.", [red]),
            collate.Example(
                "And this one, in a long sentence?", "Blue.", "The whole image is green.", [blue]
            ),
            collate.Example("Two images.", "Noise, then red.", "Only red.", [noise, red]),
            collate.Example("No image here.", "Fine.", "Not fine at all.", []),
        ]
    )


def _tower_calls(model: Any) -> list[int]:
    calls = [0]
    model.model.visual.blocks[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_reference_over_the_handed_tower_output_equals_its_own_full_pass(name: str, mode: str) -> None:
    policy, reference, processor = _pair(name)
    sharing, packing = MODES[mode]
    batch = _batch(processor)
    with torch.no_grad():
        alone = logprobs.policy_logprobs(reference, batch, prefix_sharing=sharing, packing=packing)
    handoff, why = dpo.tower_handoff(policy, reference)
    assert handoff is not None, why
    policy_wrapper = dpo.SequenceLogps(policy, sharing, packing, handoff)
    reference_wrapper = dpo.SequenceLogps(reference, sharing, packing, handoff)
    tower_runs = _tower_calls(reference)
    policy.train()
    policy_wrapper(batch)  # keeps the tower output of `batch`
    with torch.no_grad():
        handed, _tokens = reference_wrapper(batch)
    assert tower_runs == [0]  # the reference ran only its merger
    torch.testing.assert_close(handed, alone.logps, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        reference_wrapper(batch)  # one-shot: nothing left to take, the reference runs its tower again
    assert tower_runs == [1]


def test_a_pass_over_a_handed_output_has_the_same_gradients() -> None:
    """The projector and the decoder still train when the tower output comes from the other pass (under
    LoRA the policy and the reference are one module, and either may run first)."""
    policy, _, processor = _pair("tiny-qwen2-vl")
    batch = _batch(processor)
    policy.train()
    results = []
    for handed in (False, True):
        policy.zero_grad()
        handoff = logprobs.TowerHandoff()
        if handed:
            with torch.no_grad():
                logprobs.policy_logprobs(policy, batch, prefix_sharing=True, handoff=handoff)
        out = logprobs.policy_logprobs(policy, batch, prefix_sharing=True, handoff=handoff)
        (out.logps * torch.linspace(1, 2, batch.rows)).sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results.append((out.logps.detach(), grads))
    (plain, plain_grads), (handed_logps, handed_grads) = results
    torch.testing.assert_close(handed_logps, plain)
    assert set(handed_grads) == set(plain_grads) and any("merger" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(handed_grads[name], grad)


def test_the_handoff_is_refused_where_it_would_not_be_exact() -> None:
    policy, reference, _ = _pair("tiny-qwen2-vl")
    assert dpo.tower_handoff(policy, policy)[0] is not None  # LoRA: the reference is the policy itself
    trained, _ = models.load_model("builtin://tiny-qwen2-vl")  # freezeVisionTower: false
    assert "trains its vision tower" in dpo.tower_handoff(trained, reference)[1]
    other, _ = models.load_model("builtin://tiny-qwen2-vl", seed=1)
    assert "differs" in dpo.tower_handoff(policy, other)[1]
    llava, _ = models.load_model("builtin://tiny-llava-onevision")
    adapters.prepare(llava, freeze_vision_tower=True, lora=None, seed=0, field="stages.dpo")
    assert dpo.tower_handoff(llava, llava)[0] is None
