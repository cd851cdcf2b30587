"""Checkpoint on SIGTERM (suspend, preemption, drain, `kubectl delete pod`), with real torchrun on CPU.

The DPO stage (tiny Qwen2-VL, 2 ranks, gloo, ZeRO-2) runs 8 steps with no checkpoint scheduled before
the last one (everySteps 1000). SIGTERM goes to the launcher (`mmalign run --local`, which runs torchrun
in its own process, as `mmalign launch` does in a pod) once step 3 has been reported: torchrun forwards
it to both workers, they finish their step, agree to stop, commit a checkpoint of the step reached and
exit 143. The resumed run starts at that step, and its losses and final weights equal an uninterrupted
run's EXACTLY (same world size, fixed seeds, deterministic data order).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.trainer import jobs

STEPS = 8


def _job(path: Path, data_uri: str, storage_uri: str) -> Path:
    return jobs.write_job(
        path, data_uri=data_uri, storage_uri=storage_uri, procs=2,
        checkpoint={"everySteps": 1000, "keepLast": 2, "asyncUpload": True},
        stages={"dpo": {"beta": 0.1, "learningRate": 1e-3, "maxSteps": STEPS, "microBatchSize": 2,
                        "warmupRatio": 0.0}},
    )


def test_sigterm_checkpoints_the_step_reached_and_resumes_exactly(tmp_path: Path) -> None:
    data_uri = str(jobs.small_colors(tmp_path / "data"))
    env = jobs.run_env(scratch=tmp_path / "scratch")
    reference_store = tmp_path / "uninterrupted"
    reference_job = _job(tmp_path / "uninterrupted.yaml", data_uri, reference_store.as_uri() + "/")
    reference_output = jobs.check(jobs.mmalign("run", str(reference_job), "--local", env=env, timeout=300))
    reference = jobs.losses(reference_output, "dpo")
    assert sorted(reference) == list(range(1, STEPS + 1))

    store = tmp_path / "stopped"
    job = _job(tmp_path / "stopped.yaml", data_uri, store.as_uri() + "/")
    code, first_output = jobs.run_until_sigterm(job, env, "dpo", after_step=3)
    assert code == 143, first_output[-4000:]  # ExitCode.STOPPED: retryable, nothing lost
    assert "mmalign: STOPPED (exit 143): SIGTERM: stopped after step" in first_output
    before = jobs.losses(first_output, "dpo")
    reached = max(before)
    assert 3 <= reached < STEPS, "the stop came too late to interrupt the run"

    # the checkpoint is of the step reached (none was scheduled before step 8), committed by 2 ranks
    marker = json.loads((store / "dpo" / "checkpoints" / "latest").read_text())
    assert marker["step"] == reached and marker["world_size"] == 2
    assert jobs.progress(first_output, "dpo")[-1].event == "checkpoint"

    resumed_output = jobs.check(jobs.mmalign("run", str(job), "--local", env=env, timeout=300))
    start = jobs.progress(resumed_output, "dpo")[0]
    assert start.event == "start" and start.step == reached
    after = jobs.losses(resumed_output, "dpo")
    assert sorted(after) == list(range(reached + 1, STEPS + 1))
    for step, loss in {**before, **after}.items():
        assert loss == reference[step], f"step {step}: {loss} != {reference[step]}"
    weights = jobs.safetensors_state(store / "dpo" / "model")
    reference_weights = jobs.safetensors_state(reference_store / "dpo" / "model")
    assert weights.keys() == reference_weights.keys()
    assert all(torch.equal(reference_weights[k], weights[k]) for k in reference_weights)
