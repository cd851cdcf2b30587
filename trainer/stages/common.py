"""What the three stages share: the run context, the data order, errors -> exit codes, exporting.

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
import logging
import math
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mmalign.api.exit_codes import ExitCode
from mmalign.api.spec import AlignmentJobManifest, AlignmentJobSpec
from mmalign.trainer import data, storage, transfer
from mmalign.trainer.checkpoint import Checkpointer
from mmalign.trainer.engine import Distributed
from mmalign.trainer.progress import Progress

log = logging.getLogger("mmalign.trainer")


class NanLossError(Exception):
    """The loss became NaN/inf: permanent (ExitCode.NAN_LOSS)."""

    exit_code = ExitCode.NAN_LOSS


class StageConfigError(Exception):
    """The job cannot run as written (ExitCode.CONFIG_ERROR): says which field and what to do."""

    exit_code = ExitCode.CONFIG_ERROR


@dataclasses.dataclass
class Context:
    """Everything a stage needs to start: the job, who we are, where things go."""

    manifest: AlignmentJobManifest
    stage: str
    dist: Distributed

    @property
    def spec(self) -> AlignmentJobSpec:
        return self.manifest.spec

    @property
    def job_name(self) -> str:
        return str(self.manifest.metadata["name"])

    def stage_uri(self, leaf: str = "") -> str:
        """`<storage>/<stage>/<leaf>`: metrics.json, reference log-probs, ..."""
        return storage.join(self.spec.storage.uri, self.stage, leaf)

    def scratch(self, name: str) -> Path:
        """A node-local scratch folder for this job/stage (MMALIGN_LOCAL_DIR or the temp folder)."""
        base = Path(os.environ.get("MMALIGN_LOCAL_DIR") or tempfile.gettempdir())
        path = base / f"mmalign-{self.job_name}-{self.stage}" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ data order


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


# ------------------------------------------------------------------------------ checks


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


# ------------------------------------------------------------------------------ the training loop
# reward and dpo share it: resume from the last committed checkpoint, step to the end with progress and
# checkpoints, export the trained module's weights.

LossOf = Callable[[int, int, list[int]], tuple[torch.Tensor, dict[str, float]]]
"""(step, micro-batch index, pair indices) -> (loss, metrics)."""


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


def finished_before(ctx: Context, out_uri: str) -> bool:
    """An earlier attempt exported this stage's model: a restarted gang has nothing to do."""
    if not is_complete_model(out_uri):
        return False
    if ctx.dist.is_rank_0:
        say(f"{ctx.stage}: {out_uri} is complete; nothing to do")
    return True


def resume(ctx: Context, engine: Any, train: list[Any], total: int) -> tuple[Checkpointer, dict[str, Any], Progress]:
    """The stage's checkpointer; the client state of its last committed checkpoint, restored into
    `engine` ({"step": 0} when there is none); progress reporting from that step. A checkpoint written
    for other training pairs is refused: its data order would not continue where it stopped."""
    checkpointer = Checkpointer.for_stage(ctx.spec, ctx.job_name, ctx.stage, ctx.dist)
    state = checkpointer.restore(engine) or {"step": 0}
    if state.get("data") not in (None, data.fingerprint(train)):
        raise StageConfigError(f"{ctx.stage}: the training pairs changed since the checkpoint was written; "
                               f"delete {ctx.spec.checkpoint_uri(ctx.stage)} to start over")
    interval = float(os.environ.get("MMALIGN_PROGRESS_INTERVAL", "10"))
    progress = Progress(ctx.stage, total, ctx.dist.is_rank_0, start_step=int(state["step"]), interval=interval)
    return checkpointer, state, progress


def train_loop(ctx: Context, engine: Any, order: DataOrder, total: int, step: int, loss_of: LossOf,
               checkpointer: Checkpointer, progress: Progress, client_state: dict[str, Any],
               after_step: Callable[[int], None] | None = None) -> None:
    """Optimizer steps `step`+1 .. `total`: each reports progress, saves a checkpoint (with
    `client_state`) when due and at the end, then runs `after_step(step)` (e.g. an eval); finally
    waits for the last checkpoint's upload."""
    dist = ctx.dist
    while step < total:
        loss_value, averaged = train_step(engine, dist, step, list(order.micro_batches(step, dist.rank)),
                                          functools.partial(loss_of, step))
        step += 1
        progress.update(step, loss_value, order.epoch_of(step - 1), averaged)
        if checkpointer.due(step) or step == total:
            checkpointer.save(engine, step, client_state)
        if checkpointer.last_committed is not None:
            progress.checkpoint_uri = checkpointer.last_committed.uri
        if after_step is not None:
            after_step(step)
    checkpointer.finish()
    if checkpointer.last_committed is not None:
        progress.checkpoint(step, checkpointer.last_committed.uri)


def export_state(engine: Any) -> dict[str, torch.Tensor] | None:
    """The trained model's full weights on rank 0 (names without the wrapper's `model.` prefix); None
    elsewhere. A collective under ZeRO-3 (it gathers the shards): every rank must call it."""
    prefix = "model."
    state = engine.state_dict_for_export()
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} or None


# ------------------------------------------------------------------------------ outputs


def upload_model_folder(local: Path, uri: str) -> None:
    """Upload a saved model folder and mark it complete with `_complete.json` written last."""
    infos = transfer.upload_folder(local, uri)
    storage.write_json(storage.join(uri, "_complete.json"),
                       {"files": [{"name": i.relative, "size": i.size, "sha256": i.sha256} for i in infos]})


def is_complete_model(uri: str) -> bool:
    return storage.exists(storage.join(uri, "_complete.json"))


def write_metrics(ctx: Context, metrics: dict[str, Any]) -> str:
    uri = ctx.stage_uri("metrics.json")
    storage.write_json(uri, {"stage": ctx.stage, "job": ctx.job_name, **metrics})
    return uri


def device_metrics(dist: Distributed) -> dict[str, float]:
    """Peak accelerator memory of this rank (GiB), for the progress line; {} on CPU."""
    if dist.device.type != "cuda":
        return {}
    return {"gpu_peak_memory_gib": torch.cuda.max_memory_allocated(dist.device) / 2**30}


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def say(message: str) -> None:
    """A human line on stderr (rank 0 only by the caller)."""
    print(f"[mmalign] {message}", file=sys.stderr, flush=True)
