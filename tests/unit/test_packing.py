"""Packed micro-batches (trainer/prefix.py, `share(batch, pack=True)`): several pairs' prefix-shared
sequences in one row, no padding between them, give the unpacked (prefix-shared) log-probs and
gradients for every model family, with mixed lengths and image/text pairs in one row."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from mmalign.trainer import collate, logprobs, models, prefix
from tests.unit.test_prefix_sharing import _assert_equal, _examples, _grads


def _mixed(images: bool) -> list[collate.Example]:
    """Pairs of different lengths and image sizes: a short image pair, a long one (it sets the row
    width and goes first in the packed order, so the features must move), another short image pair,
    a text pair; the two short image pairs share a row."""
    words = " ".join(["every detail"] * 8)
    long = collate.Example(
        f"Describe it: {words}.",
        "A short answer.",
        f"A long rejected answer, {words}.",
        [Image.new("RGB", (40, 56), (200, 200, 20))] if images else [],
    )
    short = _examples(images)
    return [short[0], long, short[1], short[2]]


def _both(model: Any, batch: collate.Batch, mask: torch.Tensor | None = None) -> tuple[Any, ...]:
    """(unpacked, packed) prefix-shared log-probs and their parameter gradients."""
    out = []
    for pack in (False, True):
        model.zero_grad()
        layout = prefix.share(batch, logprobs.vision_token_ids(model), pack=pack)
        hidden = logprobs.forward_hidden(model, batch, layout)
        result = logprobs.sequence_logprobs(model, hidden, batch, mask, chunk_size=16, layout=layout)
        (result.logps * torch.linspace(1, 2, batch.rows)).sum().backward()  # distinct weight per row
        out += [result, _grads(model)]
    return tuple(out)


def test_packed_rows_equal_the_unpacked_values_and_gradients(family: tuple[str, Any, Any]) -> None:
    name, model, processor = family
    images = name not in ("tiny-text", "tiny-llama")
    batch = collate.Collator(processor).pairs(_mixed(images))
    packed = prefix.share(batch, pack=True)
    rows = packed.row_of_pair.tolist()
    assert rows[1] == 0 and rows[0] == rows[2] == 1  # the two short image pairs share row 1
    assert packed.packed_order[:3] == [1, 0, 2]  # the long pair's image first: features reordered
    model.train()
    _assert_equal(*_both(model, batch))


def test_packed_critique_masks(family: tuple[str, Any, Any]) -> None:
    """Reward rows score their critique tokens (left padding: prefix sharing's tests, the same columns)."""
    name, model, processor = family
    examples = _mixed(images=name not in ("tiny-text", "tiny-llama"))
    reward = collate.Collator(processor).reward(examples, critique=True)
    assert reward.critique_mask is not None
    _assert_equal(*_both(model, reward, reward.critique_mask))


def test_packing_computes_fewer_tokens_and_no_pair_sees_another() -> None:
    _, processor = models.load_model("builtin://tiny-text")
    batch = collate.Collator(processor).pairs(_mixed(images=False))
    unpacked, packed = prefix.share(batch), prefix.share(batch, pack=True)
    real = int((unpacked.segment != prefix.PAD).sum())
    assert int((packed.segment != prefix.PAD).sum()) == real  # the same tokens, fewer padded slots
    assert packed.input_ids.numel() < unpacked.input_ids.numel()
    assert packed.input_ids.shape[1] == unpacked.input_ids.shape[1]  # never wider than the longest pair
    allowed = packed.allowed()[:, 0]  # (N, S, S)
    owner = packed.owner
    for row in range(packed.rows):
        for pair in owner[row].unique().tolist():
            if pair < 0:
                continue
            inside, outside = owner[row] == pair, owner[row] != pair
            assert not allowed[row][inside][:, outside].any()
            # every token keeps its plain row's position: they restart at 0 for each pair
            positions = packed.gather(logprobs.row_positions(None, batch))[row][inside]
            assert int(positions[0]) == 0


def test_pack_rows_is_first_fit_decreasing() -> None:
    assert prefix.pack_rows([10, 3, 4, 2, 9, 1], 10) == [0, 2, 2, 2, 1, 1]  # 10 | 9 1 | 4 3 2
    assert prefix.pack_rows([12, 1], 10) == [0, 1]  # an item wider than a row gets its own
    assert prefix.pack_rows([5, 5, 5], 10) == [0, 0, 1]


def test_packing_needs_prefix_sharing_and_the_stage_wrapper_packs() -> None:
    from mmalign.trainer.stages.dpo import SequenceLogps

    model, processor = models.load_model("builtin://tiny-qwen2-vl")
    batch = collate.Collator(processor).pairs(_mixed(images=True))
    with pytest.raises(ValueError, match="stages.dpo.prefixSharing"):
        logprobs.policy_logprobs(model, batch, packing=True)
    seen: list[torch.Size] = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape), with_kwargs=True
    )
    try:
        with torch.no_grad():
            packed, tokens = SequenceLogps(model, packing=True)(batch)
            shared, shared_tokens = SequenceLogps(model)(batch)
    finally:
        handle.remove()
    assert [shape[0] for shape in seen] == [3, 4]  # packed: 3 rows for 4 pairs
    torch.testing.assert_close(packed, shared, rtol=1e-5, atol=1e-4)
    assert tokens.tolist() == shared_tokens.tolist()


# ------------------------------------------------------------------------------ token budget


def _cost(lengths: list[int]) -> int:
    width = max(lengths)
    return (max(prefix.pack_rows(lengths, width)) + 1) * width


def test_budget_groups_keep_the_order_and_the_budget() -> None:
    from mmalign.trainer.order import budget_groups

    lengths = [30, 10, 10, 10, 25, 5, 90, 40, 40]
    groups = budget_groups(lengths, 60)
    assert [i for group in groups for i in group] == list(range(len(lengths)))  # data order, all once
    for group in groups:
        assert len(group) == 1 or _cost([lengths[i] for i in group]) <= 60
    assert [6] in groups  # 90 tokens: over the budget, a micro-batch of its own
    assert groups[0] == [0, 1, 2, 3]  # rows [30] [10 10 10] of width 30: 60 tokens; + 25 would make 90


def test_token_budget_order_is_deterministic_world_size_independent_and_within_budget() -> None:
    import random

    from mmalign.trainer.order import TokenBudgetOrder

    rng = random.Random(0)
    lengths = tuple(rng.choice([rng.randint(20, 60), rng.randint(200, 400)]) for _ in range(200))

    def order(accumulation: int, world: int) -> TokenBudgetOrder:
        return TokenBudgetOrder(len(lengths), 1, accumulation, world, 7, lengths=lengths, budget=800)

    one, two = order(4, 1), order(2, 2)
    assert one.steps_per_epoch == two.steps_per_epoch > 0
    for step in range(one.steps_per_epoch + 2):  # into the second epoch
        mine = one.micro_batches(step, 0)
        theirs = [m for k in range(2) for m in (two.micro_batches(step, 0)[k], two.micro_batches(step, 1)[k])]
        assert sorted(map(sorted, mine)) == sorted(map(sorted, theirs))  # the same global batch
        assert mine == order(4, 1).micro_batches(step, 0)  # a pure function: a resumed run continues alike
        for micro in mine:
            assert _cost([lengths[i] for i in micro]) <= 800 or len(micro) == 1
    epoch = [i for step in range(one.steps_per_epoch) for m in one.micro_batches(step, 0) for i in m]
    assert len(epoch) == len(set(epoch))  # no pair twice in an epoch
    assert one.micro_batches(0, 0) != one.micro_batches(one.steps_per_epoch, 0)  # epochs reshuffle


def test_the_token_budget_is_an_alternative_to_the_pair_count() -> None:
    from mmalign.api.spec import AlignmentJobSpec
    from mmalign.api.stages import TOKEN_BUDGET_RULES, DpoStage

    assert DpoStage().packing is True and DpoStage().max_tokens_per_batch is None
    base = {
        "model": {"uri": "builtin://tiny-text"},
        "data": {"uri": "builtin://tiny-pairs"},
        "storage": {"uri": "file:///tmp/x"},
    }
    ok = {"maxTokensPerBatch": 4096}
    assert (
        AlignmentJobSpec.model_validate({**base, "stages": {"dpo": ok}}).stages.dpo.max_tokens_per_batch
        == 4096
    )
    for wrong in ({"microBatchSize": 4}, {"prefixSharing": False}, {"packing": False}):
        with pytest.raises(ValueError, match="maxTokensPerBatch replaces microBatchSize"):
            AlignmentJobSpec.model_validate({**base, "stages": {"dpo": {**ok, **wrong}}})
    assert "prefixSharing and packing" in TOKEN_BUDGET_RULES


def test_the_bench_packed_variant_trains_like_the_shared_one_on_fewer_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bench/dpo_vs_trl.py's `mmalign:*:packed` on mixed-length pairs (no TRL needed)."""
    import dataclasses
    import sys

    from bench import dpo_vs_trl as bench

    monkeypatch.setitem(sys.modules, "trl", None)
    cfg = bench.BenchConfig(
        model="tiny", data="text", pairs=6, tokens=160, steps=1, warmup=0, rounds=1, mixed=True
    )
    report = bench.run_bench(cfg, ["mmalign:precomputed", "mmalign:precomputed:packed"])
    rows, shape = report["variants"], report["batch"]
    assert rows["mmalign:precomputed:packed"]["first_losses"] == pytest.approx(
        rows["mmalign:precomputed"]["first_losses"]
    )
    assert "speedup_vs_shared" in rows["mmalign:precomputed:packed"]
    assert (
        shape["packed_computed_tokens"]
        < shape["prefix_shared_computed_tokens"]
        < shape["unshared_computed_tokens"]
    )
    assert bench.make_examples(
        dataclasses.replace(cfg, mixed=False), bench.tiny.build_processor("text")
    )  # unchanged path
