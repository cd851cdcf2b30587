"""Which pairs each rank works on: the training schedule (`DataOrder`) and the blocks for eval and scoring.

The data order is a pure function of (seed, epoch, step), so a resumed run continues with the same
micro-batches, and the SAME global batch is used whatever the world size: step s takes the pairs
`order[b*G : (b+1)*G]` (G = micro_batch x accumulation x world size, b = s mod steps-per-epoch) and
splits them into G/micro_batch micro-batches, micro-batch k of rank r being number k*world+r. With a
loss that is a mean over pairs, world size 1 vs 2 and (micro-batch x accumulation) splits therefore
give the same updates up to float rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Iterator
from typing import Any

from mmalign.trainer import data
from mmalign.trainer.context import Context, StageConfigError


@dataclasses.dataclass(frozen=True)
class DataOrder:
    """The deterministic schedule of pair indices (see the module docstring)."""

    pairs: int
    micro_batch: int
    accumulation: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.pairs // self.global_batch

    def total_steps(self, epochs: int, max_steps: int | None) -> int:
        return max_steps if max_steps is not None else epochs * self.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        return step // max(1, self.steps_per_epoch)

    def _order(self, epoch: int) -> list[int]:
        indices = list(range(self.pairs))
        random.Random(f"mmalign-order-{self.seed}-{epoch}").shuffle(indices)
        return indices

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This rank's `accumulation` micro-batches (pair indices) for optimizer step `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        start = position * self.global_batch
        out = []
        for k in range(self.accumulation):
            first = start + (k * self.world_size + rank) * self.micro_batch
            out.append(order[first:first + self.micro_batch])
        return out


def split_global_batch(global_batch: int, world_size: int, micro_batch: int, field: str) -> tuple[int, int]:
    """(micro-batch, accumulation) that make `global_batch` pairs per step on `world_size` ranks: the
    micro-batch as written when it divides the rank's share, else the largest one below it that does
    (a smaller micro-batch never needs more memory); accumulation takes the rest. Used when a stage
    resumes a checkpoint written by another world size: the same global batch gives the same data order,
    step count and learning-rate schedule (the module docstring)."""
    share, rest = divmod(global_batch, world_size)
    if rest or share == 0:
        raise StageConfigError(
            f"{field}: the checkpoint's optimizer steps take {global_batch} pairs (microBatchSize x "
            f"gradientAccumulation x its world size), which {world_size} ranks cannot share evenly; resume with "
            f"a world size (resources.nodes x procPerNode) that divides {global_batch}, or delete the "
            "stage's checkpoints to start it over"
        )
    micro = max(m for m in range(1, min(micro_batch, share) + 1) if share % m == 0)
    return micro, share // micro


def check_enough_pairs(order: DataOrder, field: str) -> None:
    if order.steps_per_epoch < 1:
        raise StageConfigError(
            f"{field}: one optimizer step needs {order.global_batch} training pairs (microBatchSize "
            f"{order.micro_batch} x gradientAccumulation {order.accumulation} x world size "
            f"{order.world_size}) but the training split has {order.pairs}; lower them or add data"
        )


def plan_training(ctx: Context, pairs: list[Any], config: Any, field: str,
                  ) -> tuple[list[Any], list[Any], DataOrder, int]:
    """Pairs -> (train, held_out, data order, optimizer steps): the split by query (a query's pairs stay
    together), the seeded order every rank shares, and a clear error when the batch needs more pairs."""
    spec = ctx.spec
    train, held_out = data.split_by_query(pairs, spec.data.eval_fraction, spec.seed)
    order = DataOrder(len(train), config.micro_batch_size, config.gradient_accumulation, ctx.dist.world_size,
                      spec.seed)
    check_enough_pairs(order, field)
    return train, held_out, order, order.total_steps(config.epochs, config.max_steps)


def rank_slice(count: int, rank: int, world_size: int) -> range:
    """Contiguous block of `range(count)` for a rank (blocks in rank order cover it exactly)."""
    return range(count * rank // world_size, count * (rank + 1) // world_size)


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ------------------------------------------------------------------------------ token budget


def budget_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of item positions (data order kept) whose packed cost stays within `budget`:
    the cost of a group is what its packed forward computes, rows x row width (prefix.pack_rows into
    rows as wide as the group's longest item, as prefix.share packs them). An item over the budget alone
    is a group of its own."""
    from mmalign.trainer.prefix import pack_rows

    groups: list[list[int]] = []
    current: list[int] = []
    for position, length in enumerate(lengths):
        trial = [lengths[p] for p in current] + [length]
        width = max(trial)
        if current and (max(pack_rows(trial, width)) + 1) * width > budget:
            groups.append(current)
            current = []
        current.append(position)
    if current:
        groups.append(current)
    return groups


@dataclasses.dataclass(frozen=True)
class TokenBudgetOrder(DataOrder):
    """The schedule with micro-batches cut by a token budget (stages.dpo.maxTokensPerBatch) instead of
    a pair count: each epoch's seeded order (the same shuffle as DataOrder's) is cut into budget_groups
    of the pairs' packed lengths; optimizer step s takes micro-batches [b*G', (b+1)*G') of its epoch
    (G' = accumulation x world size), micro-batch k of rank r being number k*world+r, as before. Still a
    pure function of (seed, epoch, step) and the same whatever the world size. Steps per epoch come from
    epoch 0 (`micro_batch` is 1); an epoch cut into fewer micro-batches reuses its first ones."""

    lengths: tuple[int, ...] = ()  # per training pair: packed tokens (chosen + rejected - shared prompt)
    budget: int = 0

    def _micro_batches_of(self, epoch: int) -> list[list[int]]:
        return _budget_epoch(self, epoch)

    @property
    def steps_per_epoch(self) -> int:
        return len(self._micro_batches_of(0)) // (self.accumulation * self.world_size)

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        epoch, position = divmod(step, self.steps_per_epoch)
        batches = self._micro_batches_of(epoch)
        start = position * self.accumulation * self.world_size
        return [batches[(start + k * self.world_size + rank) % len(batches)] for k in range(self.accumulation)]


@functools.lru_cache(maxsize=4)
def _budget_epoch(order: TokenBudgetOrder, epoch: int) -> list[list[int]]:
    """An epoch's micro-batches, cut once (the loop asks for them every step)."""
    indices = order._order(epoch)
    groups = budget_groups([order.lengths[i] for i in indices], order.budget)
    return [[indices[p] for p in group] for group in groups]
