"""Restore that scales: each node downloads only its own ranks' files, and a stage resumes a checkpoint
written by another world size (real torchrun on CPU, gloo, ZeRO-2, tiny Qwen2-VL).

A run is stopped with SIGTERM after step 3 (it commits a checkpoint of the step reached) and resumed with
another number of ranks: DeepSpeed's universal checkpoint conversion re-partitions the optimizer state,
and the stage keeps the checkpoint's global batch (4 pairs per step) by changing the gradient
accumulation, so the data order, the step count and the learning-rate schedule continue unchanged.

Tolerance, against an uninterrupted run: the world-size invariance of tests/trainer/test_invariants.py
(the same sums split differently over ranks and micro-batches, float32): 2e-5 relative on each step's
loss, 1e-5 absolute on the final weights. Measured: see docs/trainer.md (Checkpoints).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmalign.trainer.checkpoint import files_for
from mmalign.trainer.context import StageConfigError
from mmalign.trainer.order import split_global_batch
from tests.trainer import jobs

STEPS = 8


def test_a_node_downloads_only_its_own_ranks_files() -> None:
    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_2_mp_rank_00_model_states.pt",
             "zero_pp_rank_3_mp_rank_00_optim_states.pt", "rng-rank-00001.pt", "rng-rank-00002.pt"]
    files = [{"name": name, "sha256": "x"} for name in names]
    assert [f["name"] for f in files_for(files, {2, 3})] == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_2_mp_rank_00_model_states.pt",
        "zero_pp_rank_3_mp_rank_00_optim_states.pt", "rng-rank-00002.pt"]


def test_the_global_batch_is_kept_over_another_world_size() -> None:
    assert split_global_batch(4, 1, micro_batch=2, field="stages.dpo") == (2, 2)  # 2 ranks -> 1
    assert split_global_batch(4, 2, micro_batch=2, field="stages.dpo") == (2, 1)  # 1 rank -> 2
    assert split_global_batch(12, 4, micro_batch=2, field="stages.dpo") == (1, 3)  # never a larger micro-batch
    with pytest.raises(StageConfigError, match="stages.dpo: .* 4 pairs .* 3 ranks cannot share evenly"):
        split_global_batch(4, 3, micro_batch=2, field="stages.dpo")


def _job(path: Path, data_uri: str, store: Path, procs: int, stage: str, config: dict[str, Any]) -> Path:
    return jobs.write_job(path, data_uri=data_uri, storage_uri=store.as_uri() + "/", procs=procs,
                          checkpoint={"everySteps": 1000, "keepLast": 2, "asyncUpload": True},
                          stages={stage: {"learningRate": 1e-3, "maxSteps": STEPS, "warmupRatio": 0.0, **config}})


def _stop_and_resume(tmp_path: Path, stage: str, config: dict[str, Any], before: int, after: int,
                     signal_rank: int | None = None) -> None:
    """Uninterrupted on `before` ranks; then stopped on `before` ranks (SIGTERM to the launcher, or to
    the worker `signal_rank` only) and resumed on `after` ranks."""
    data_uri = str(jobs.small_colors(tmp_path / "data"))
    env = jobs.run_env(scratch=tmp_path / "scratch")
    reference_store = tmp_path / "uninterrupted"
    reference_job = _job(tmp_path / "uninterrupted.yaml", data_uri, reference_store, before, stage, config)
    reference = jobs.losses(jobs.check(jobs.mmalign("run", str(reference_job), "--local", env=env)), stage)

    store = tmp_path / "resized"
    code, output = jobs.run_until_sigterm(_job(tmp_path / "before.yaml", data_uri, store, before, stage, config),
                                          env, stage, after_step=3, rank=signal_rank)
    assert code == 143, output[-4000:]
    assert output.count("mmalign: STOPPED (exit 143)") == before, output[-4000:]  # every rank stopped
    marker = json.loads((store / stage / "checkpoints" / "latest").read_text())
    reached = marker["step"]
    assert marker["world_size"] == before and 3 <= reached < STEPS

    resumed_job = _job(tmp_path / "after.yaml", data_uri, store, after, stage, config)
    resumed = jobs.check(jobs.mmalign("run", str(resumed_job), "--local", env=env))
    assert f"resuming a checkpoint of {before} ranks on {after}" in resumed
    start = jobs.progress(resumed, stage)[0]
    assert start.event == "start" and start.step == reached
    final = json.loads((store / stage / "checkpoints" / "latest").read_text())
    assert final["world_size"] == after and final["global_batch"] == 4  # a later resize keeps it too
    losses = jobs.losses(resumed, stage)
    assert sorted(losses) == list(range(reached + 1, STEPS + 1))
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], rel=2e-5), f"step {step}: {loss} vs {reference[step]}"
    weights = jobs.safetensors_state(store / stage / "model")
    reference_weights = jobs.safetensors_state(reference_store / stage / "model")
    assert weights.keys() == reference_weights.keys()
    worst = max(float((weights[k] - reference_weights[k]).abs().max()) for k in weights)
    relative = max(abs(loss - reference[step]) / abs(reference[step]) for step, loss in losses.items())
    print(f"{stage} {before} -> {after} ranks from step {reached}: losses within {relative:.1e} relative, "
          f"weights within {worst:.1e}")
    assert worst < 1e-5, worst


def test_dpo_resumes_on_fewer_ranks(tmp_path: Path) -> None:
    """2 ranks x micro-batch 2, then 1 rank: micro-batch 2 x accumulation 2. SIGTERM reaches rank 1 only
    (one pod of a gang deleted): rank 0 stops after the same step, through the all-reduced flag."""
    _stop_and_resume(tmp_path, "dpo", {"beta": 0.1, "microBatchSize": 2}, before=2, after=1, signal_rank=1)


def test_reward_resumes_on_more_ranks(tmp_path: Path) -> None:
    """1 rank x micro-batch 2 x accumulation 2, then 2 ranks: accumulation 1 (scalar reward model)."""
    _stop_and_resume(tmp_path, "reward", {"critique": False, "microBatchSize": 2, "gradientAccumulation": 2},
                     before=1, after=2)
