"""The training loop reward and dpo share: resume, then optimizer steps to the end with progress and
checkpoints.

    checkpointer, state, progress = resume(ctx, engine, train, total, made_by)
    train_loop(ctx, engine, order, total, state["step"], loss_of, checkpointer, progress, client_state)

A stage supplies only `loss_of(step, micro, pair_indices) -> (loss, metrics)`; which pairs a rank gets
at a step is the data order's (order.py), when a checkpoint is due the checkpointer's
(checkpoint.py). Reads top to bottom: resume, the loop, the stop on SIGTERM, one step, the checks and
metrics of a step.

SIGTERM (suspend, preemption, node drain, `kubectl delete pod`; torchrun forwards it to every worker of
the pod) does not kill the loop: the rank finishes its step, all ranks agree to stop (one all-reduce of a
flag per step, so the ranks of a pod that was not signalled stop after the same step and nobody hangs in
a collective), save and commit the checkpoint of the step reached, and exit 143 (`Stopped`). The next
attempt resumes at that step. If the save does not finish within the pod's grace period, the kubelet
kills the pod and `latest` still names the previous complete checkpoint (checkpoint.py writes it last).
"""

from __future__ import annotations

import functools
import math
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, TypeVar

import torch

from mmalign.api import layout
from mmalign.api.exit_codes import ExitCode
from mmalign.api.stages import DpoStage, RewardStage
from mmalign.trainer import data, identity, storage
from mmalign.trainer.checkpoint import Checkpointer, CheckpointInfo
from mmalign.trainer.context import Context, StageConfigError, say
from mmalign.trainer.engine import Distributed
from mmalign.trainer.order import DataOrder, split_global_batch
from mmalign.trainer.progress import Progress


class NanLossError(Exception):
    """The loss became NaN/inf: permanent (ExitCode.NAN_LOSS)."""

    exit_code = ExitCode.NAN_LOSS


class Stopped(Exception):
    """SIGTERM reached the training loop and every rank committed the checkpoint of the step reached:
    exit 143 (ExitCode.STOPPED; 128 + SIGTERM, retryable), the next attempt resumes at that step."""

    exit_code = ExitCode.STOPPED


_StageConfig = TypeVar("_StageConfig", RewardStage, DpoStage)

LossOf = Callable[[int, int, list[int]], tuple[torch.Tensor, dict[str, float]]]
"""(step, micro-batch index, pair indices) -> (loss, metrics)."""


def resumed_batch(ctx: Context, config: _StageConfig, made_by: identity.Identity, field: str) -> _StageConfig:
    """The stage config to plan the data order and build the engine with: as written, or, when the
    stage's last checkpoint of this identity took another global batch than the config gives on this
    world size (it was written by another world size: the job re-created with other resources), with
    the micro-batch and accumulation that keep that checkpoint's global batch here
    (order.split_global_batch). Call before order.plan_training; every rank calls it."""
    prefix = ctx.spec.checkpoint_uri(ctx.stage)
    marker = None
    if ctx.dist.is_rank_0 and not identity.changed(identity.recorded(storage.join(prefix, layout.IDENTITY)),
                                                   made_by):
        try:
            marker = storage.read_json(storage.join(prefix, layout.MARKER))
        except FileNotFoundError:
            pass
    marker = ctx.dist.broadcast_object(marker)
    if marker is None:
        return config
    per_rank = config.micro_batch_size * config.gradient_accumulation
    # markers written before `global_batch` was recorded: by the config as written
    global_batch = int(marker.get("global_batch") or per_rank * int(marker["world_size"]))
    if global_batch == per_rank * ctx.dist.world_size:
        return config
    micro, accumulation = split_global_batch(global_batch, ctx.dist.world_size, config.micro_batch_size, field)
    if ctx.dist.is_rank_0:
        say(f"{ctx.stage}: resuming a checkpoint of {marker['world_size']} ranks on {ctx.dist.world_size}: "
            f"keeping its {global_batch} pairs per step as microBatchSize {micro} x gradientAccumulation "
            f"{accumulation}")
    return config.model_copy(update={"micro_batch_size": micro, "gradient_accumulation": accumulation})


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
    eval); finally waits for the last checkpoint's upload. On SIGTERM: saves at the step reached and
    raises Stopped (see the module docstring)."""
    dist = ctx.dist
    checkpointer.global_batch = order.global_batch  # in the marker: a resize keeps it (resumed_batch)
    grace = ctx.spec.pod_template.termination_grace_period_seconds
    warned = False
    with StopRequest() as stop:
        while step < total:
            started = time.monotonic()
            loss_value, averaged = train_step(engine, dist, step, list(order.micro_batches(step, dist.rank)),
                                              functools.partial(loss_of, step))
            step += 1
            progress.update(step, loss_value, order.epoch_of(step - 1), averaged)
            stopping = stop.agreed(dist)  # a collective: every rank decides the same, after the same step
            saved = checkpointer.save(engine, step, client_state, last=step == total or stopping)
            if checkpointer.last_committed is not None:
                progress.checkpoint_uri = checkpointer.last_committed.uri
            if stopping:
                assert saved is not None
                stop_at(checkpointer, progress, stop, saved, total, grace)
            if dist.is_rank_0 and not warned:
                warned = warn_if_grace_too_short(checkpointer, time.monotonic() - started, grace)
            if after_step is not None:
                after_step(step)
    checkpointer.finish()
    if checkpointer.last_committed is not None:
        progress.checkpoint(step, checkpointer.last_committed.uri)


class StopRequest:
    """While the training loop runs: SIGTERM sets a flag instead of killing the process (the handler
    only records the time: printing from a handler can break the stream it interrupts); `agreed(dist)`
    is True on every rank once any rank got it. The previous handler is restored at the end, so a
    SIGTERM during the final export kills as usual (the last checkpoint is committed by then)."""

    def __init__(self) -> None:
        self.signalled_at: float | None = None
        self._installed = False
        self._previous: Any = signal.SIG_DFL

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signalled_at = self.signalled_at or time.monotonic()

    def agreed(self, dist: Distributed) -> bool:
        return dist.any(self.signalled_at is not None)


def stop_at(checkpointer: Checkpointer, progress: Progress, stop: StopRequest, saved: CheckpointInfo,
            total: int, grace: int) -> None:
    """After the save the loop started at the step reached: wait until it is committed (rank 0 commits;
    the barrier after it), report it, and raise Stopped. A failed upload raises StorageError instead
    (`latest` did not move)."""
    checkpointer.finish()
    step, uri = saved.step, saved.uri
    progress.checkpoint(step, uri)
    took = "(SIGTERM reached another pod)"
    if stop.signalled_at is not None:
        since = time.monotonic() - stop.signalled_at
        took = f"{since:.1f}s after SIGTERM"
        if progress.enabled and since > 0.8 * grace:
            say(f"the checkpoint on SIGTERM took {since:.0f}s of the {grace}s grace period: raise "
                "spec.podTemplate.terminationGracePeriodSeconds, or a slower save will be killed")
    raise Stopped(f"SIGTERM: stopped after step {step} of {total}; checkpoint {uri} committed {took}; "
                  "the next attempt resumes there")


def warn_if_grace_too_short(checkpointer: Checkpointer, step_seconds: float, grace: int) -> bool:
    """When one step plus the last save (write, upload, commit) took longer than the pod's grace period,
    a SIGTERM would not leave time to checkpoint the step reached: say so (True: said)."""
    save_seconds = checkpointer.last_save_seconds
    if save_seconds is not None and step_seconds + save_seconds > grace:
        say(f"one step ({step_seconds:.0f}s) plus one checkpoint save ({save_seconds:.0f}s) "
            f"take longer than spec.podTemplate.terminationGracePeriodSeconds={grace}: on SIGTERM (suspend, "
            "preemption, drain) the pod would be killed before its checkpoint is committed; raise it")
        return True
    return False


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
