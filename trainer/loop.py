"""The training loop reward and dpo share: resume, then optimizer steps to the end with progress and
checkpoints.

    checkpointer, state, progress = resume(ctx, engine, train, total, made_by)
    train_loop(ctx, engine, order, total, state["step"], loss_of, checkpointer, progress, client_state)

A stage supplies only `loss_of(step, micro, pair_indices) -> (loss, metrics)`; which pairs a rank gets
at a step is the data order's (order.py), when a checkpoint is due the checkpointer's
(checkpoint.py). Reads top to bottom: resume, the loop, one step, the checks and metrics of a step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from mmalign.api.exit_codes import ExitCode
from mmalign.trainer import data, identity
from mmalign.trainer.checkpoint import Checkpointer
from mmalign.trainer.context import Context, StageConfigError
from mmalign.trainer.engine import Distributed
from mmalign.trainer.order import DataOrder
from mmalign.trainer.progress import Progress


class NanLossError(Exception):
    """The loss became NaN/inf: permanent (ExitCode.NAN_LOSS)."""

    exit_code = ExitCode.NAN_LOSS


LossOf = Callable[[int, int, list[int]], tuple[torch.Tensor, dict[str, float]]]
"""(step, micro-batch index, pair indices) -> (loss, metrics)."""


def resume(ctx: Context, engine: Any, train: list[Any], total: int, made_by: identity.Identity,
           ) -> tuple[Checkpointer, dict[str, Any], Progress]:
    """The stage's checkpointer; the client state of its last committed checkpoint, restored into
    `engine` ({"step": 0} when there is none); progress reporting from that step. Checkpoints written
    for another stage identity (`made_by`: the user changed the job's parameters or its inputs) are
    deleted and the stage starts over, with a log line naming the changed fields (identity.claim); a
    checkpoint written for other training pairs is refused: its data order would not continue."""
    identity.claim(ctx, ctx.spec.checkpoint_uri(ctx.stage), made_by, "checkpoints")
    checkpointer = Checkpointer.for_stage(ctx.spec, ctx.job_name, ctx.stage, ctx.dist)
    state = checkpointer.restore(engine) or {"step": 0}
    if state.get("data") not in (None, data.fingerprint(train)):
        raise StageConfigError(f"{ctx.stage}: the training pairs changed since the checkpoint was written; "
                               f"delete {ctx.spec.checkpoint_uri(ctx.stage)} to start over")
    progress = Progress.for_stage(ctx.stage, total, ctx.dist.is_rank_0, start_step=int(state["step"]))
    return checkpointer, state, progress


def train_loop(ctx: Context, engine: Any, order: DataOrder, total: int, step: int, loss_of: LossOf,
               checkpointer: Checkpointer, progress: Progress, client_state: dict[str, Any],
               after_step: Callable[[int], None] | None = None) -> None:
    """Optimizer steps `step`+1 .. `total`: each reports progress, offers the checkpointer a save (with
    `client_state`; it saves when due and at the last step), then runs `after_step(step)` (e.g. an
    eval); finally waits for the last checkpoint's upload."""
    dist = ctx.dist
    while step < total:
        loss_value, averaged = train_step(engine, dist, step, list(order.micro_batches(step, dist.rank)),
                                          functools.partial(loss_of, step))
        step += 1
        progress.update(step, loss_value, order.epoch_of(step - 1), averaged)
        checkpointer.save(engine, step, client_state, last=step == total)
        if checkpointer.last_committed is not None:
            progress.checkpoint_uri = checkpointer.last_committed.uri
        if after_step is not None:
            after_step(step)
    checkpointer.finish()
    if checkpointer.last_committed is not None:
        progress.checkpoint(step, checkpointer.last_committed.uri)


def train_step(engine: Any, dist: Distributed, step: int, micro_batches: list[list[int]],
               loss_of: Callable[[int, list[int]], tuple[torch.Tensor, dict[str, float]]],
               ) -> tuple[float, dict[str, float]]:
    """One optimizer step over this rank's micro-batches (the part every training stage shares).

    For each micro-batch: `loss_of(micro_index, pair_indices)` -> (loss, metrics); NaN check on all
    ranks; backward; engine.step() (DeepSpeed applies the optimizer at the accumulation boundary).
    Returns (loss, metrics), both averaged over micro-batches and ranks, plus learning rate and memory."""
    seen: list[dict[str, float]] = []
    for micro, indices in enumerate(micro_batches):
        loss, metrics = loss_of(micro, indices)
        check_finite(dist, loss, step)
        engine.backward(loss)
        engine.step()
        seen.append({**metrics, "loss": float(loss.detach())})
    local = {k: sum(m[k] for m in seen) / len(seen) for k in seen[0]}
    averaged = mean_over_ranks(dist, local)
    loss_value = averaged.pop("loss")
    averaged["learning_rate"] = engine.learning_rate
    averaged.update(device_metrics(dist))
    return loss_value, averaged


def check_finite(dist: Distributed, loss: torch.Tensor, step: int) -> None:
    """Raise NanLossError on EVERY rank when any rank's loss is NaN/inf (so all exit the same way)."""
    bad = not bool(torch.isfinite(loss.detach()).all())
    if dist.any(bad):
        raise NanLossError(f"loss is not finite at step {step}; lower the learning rate or check the data")


def mean_over_ranks(dist: Distributed, values: dict[str, float], counts: dict[str, float] | None = None
                    ) -> dict[str, float]:
    """Average scalar metrics over ranks (weighted by `counts` when given, else plain mean)."""
    keys = sorted(values)
    if counts:
        sums = dist.all_reduce_sum([values[k] * counts.get(k, 1.0) for k in keys]
                                   + [counts.get(k, 1.0) for k in keys])
        n = len(keys)
        return {k: sums[i] / sums[n + i] if sums[n + i] else math.nan for i, k in enumerate(keys)}
    sums = dist.all_reduce_sum([values[k] for k in keys])
    return {k: sums[i] / dist.world_size for i, k in enumerate(keys)}


def device_metrics(dist: Distributed) -> dict[str, float]:
    """Peak accelerator memory of this rank (GiB), for the progress line; {} on CPU."""
    if dist.device.type != "cuda":
        return {}
    return {"gpu_peak_memory_gib": torch.cuda.max_memory_allocated(dist.device) / 2**30}
