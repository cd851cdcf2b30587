"""Pure pieces of the stages: the data order, the progress line (and that the operator parses it),
launch's exit-code mapping and env reading."""

from __future__ import annotations

import io
import json

import pytest

from mmalign.api.progress import parse_line
from mmalign.trainer import launch
from mmalign.trainer.context import StageConfigError
from mmalign.trainer.order import DataOrder, check_enough_pairs, rank_slice
from mmalign.trainer.progress import Progress


def _global_batch(order: DataOrder, step: int) -> list[int]:
    return sorted(i for rank in range(order.world_size) for micro in order.micro_batches(step, rank) for i in micro)


def test_data_order_is_the_same_global_batch_for_any_split() -> None:
    splits = [DataOrder(37, 4, 1, 1, seed=3), DataOrder(37, 2, 1, 2, seed=3), DataOrder(37, 2, 2, 1, seed=3),
              DataOrder(37, 1, 2, 2, seed=3)]
    assert {o.steps_per_epoch for o in splits} == {9}
    for step in range(20):  # crosses an epoch boundary
        batches = [_global_batch(o, step) for o in splits]
        assert all(b == batches[0] for b in batches) and len(batches[0]) == 4
    epoch = [i for step in range(9) for i in _global_batch(splits[0], step)]
    assert len(set(epoch)) == 36  # no pair twice in an epoch; the 37th is dropped
    assert _global_batch(splits[0], 9) != _global_batch(splits[0], 0)  # a new shuffle per epoch
    assert DataOrder(37, 4, 1, 1, seed=4).micro_batches(0, 0) != splits[0].micro_batches(0, 0)


def test_not_enough_pairs_is_a_config_error() -> None:
    with pytest.raises(StageConfigError, match="needs 16 training pairs .* has 10"):
        check_enough_pairs(DataOrder(10, 4, 2, 2, seed=0), "stages.dpo")


def test_rank_slices_cover_in_order() -> None:
    for count in (0, 1, 7, 48):
        for world in (1, 2, 3):
            assert [i for r in range(world) for i in rank_slice(count, r, world)] == list(range(count))


def test_progress_lines_parse_for_the_operator() -> None:
    out = io.StringIO()
    progress = Progress("dpo", total=10, enabled=True, interval=0, out=out)
    progress.update(1, loss=0.69, epoch=0, metrics={"rewards/accuracy": 0.5})
    progress.checkpoint(1, "s3://b/j/dpo/checkpoints/step-00000001/")
    progress.update(2, loss=float("nan"))
    progress.finish({"eval_reward_accuracy": 0.75})
    lines = out.getvalue().splitlines()
    assert [parse_line(line).event for line in lines] == ["start", "step", "checkpoint", "step", "end"]
    last = parse_line(lines[-1])
    assert last is not None and last.step == 2 and last.total == 10
    assert last.checkpoint == "s3://b/j/dpo/checkpoints/step-00000001/"
    assert last.metrics["eval_reward_accuracy"] == 0.75
    assert json.loads(lines[3].split(" ", 1)[1])["loss"] is None  # NaN is sent as null, never as NaN
    silent = io.StringIO()
    Progress("dpo", total=10, enabled=False, out=silent).finish()
    assert silent.getvalue() == ""


def test_launch_reads_torchrun_env_and_maps_worker_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"PET_NNODES": "3", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "2",
                       "PET_MASTER_ADDR": "job-dpo-0-0.job.ns.svc", "PET_MASTER_PORT": "29400"}.items():
        monkeypatch.setenv(key, value)
    assert launch.torchrun_env() == {"nnodes": 3, "nproc_per_node": 8, "node_rank": 2,
                                     "master_addr": "job-dpo-0-0.job.ns.svc", "master_port": 29400}

    class Failure:
        def __init__(self, code: int, timestamp: int = 1000) -> None:
            self.exitcode, self.timestamp = code, timestamp

    def root(failures: dict[int, Failure]) -> tuple[int, int]:
        rank, failure = launch.root_failure(failures)
        return rank, launch.worker_exit_code(failure)

    # rank 1 SIGKILLed (OOM); rank 0 saw "Connection reset by peer" and exited 1 in the same poll
    assert root({0: Failure(1), 1: Failure(-9)}) == (1, 137)
    # ... also when torchrun's whole-second stamps straddle a second within that one poll
    assert root({0: Failure(1, timestamp=999), 1: Failure(-9)}) == (1, 137)
    # a clearly earlier failure is the root cause, whatever its kind
    assert root({0: Failure(1, timestamp=990), 1: Failure(-9)}) == (0, 1)
    # a stop request (SIGTERM) is a consequence: the NaN exit explains the run
    assert root({0: Failure(4), 1: Failure(-15)}) == (0, 4)
    # two plain exits in the same instant: the lowest rank
    assert root({3: Failure(5), 2: Failure(1)}) == (2, 1)
    assert launch.worker_exit_code(Failure(0)) == 1
