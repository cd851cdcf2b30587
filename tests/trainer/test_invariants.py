"""Training invariants on the DPO stage (tiny Qwen2-VL, 36 training pairs with images, seed 0, CPU/gloo):

* world size 1 vs 2 (micro-batch 4 vs 2): the same loss trajectory and final weights;
* micro-batch x gradient accumulation: (4 x 1) vs (2 x 2) on one process: the same;
* SIGKILL of rank 1 mid-run (async checkpoint upload to a real S3 server every 2 steps), restart:
  the run resumes from S3 at the last committed step and the loss trajectory and final weights equal
  the uninterrupted run's EXACTLY (same world size, fixed seeds, deterministic data order).

Tolerance for the first two: the mean over pairs is the same sum split differently (float32 rounding,
reference log-probs computed in differently padded batches): 2e-5 relative on losses, 1e-5 absolute
on weights after 8 AdamW steps at lr 1e-3. Measured: see docs/trainer.md.

Loss: fixed-β DPO (no SFT term: its token-mean NLL is not a per-pair mean, so it is not split-invariant).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.s3_server import S3Server, require_weed
from tests.trainer import jobs

STEPS = 8


def _dpo_job(path: Path, data_uri: str, storage_uri: str, procs: int, micro: int, accumulation: int,
             every: int = 1000, async_upload: bool = True) -> Path:
    return jobs.write_job(
        path, data_uri=data_uri, storage_uri=storage_uri, procs=procs,
        checkpoint={"everySteps": every, "keepLast": 2, "asyncUpload": async_upload},
        stages={"dpo": {"beta": 0.1, "learningRate": 1e-3, "maxSteps": STEPS, "microBatchSize": micro,
                        "gradientAccumulation": accumulation, "warmupRatio": 0.0}},
    )


def _run(tmp_path: Path, name: str, data_uri: str, procs: int, micro: int, accumulation: int
         ) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
    store = tmp_path / name
    job = _dpo_job(tmp_path / f"{name}.yaml", data_uri, store.as_uri() + "/", procs, micro, accumulation)
    output = jobs.check(jobs.mmalign("run", str(job), "--local", env=jobs.run_env(scratch=tmp_path / "scratch"),
                                     timeout=300))
    trajectory = jobs.losses(output, "dpo")
    assert sorted(trajectory) == list(range(1, STEPS + 1))
    return trajectory, jobs.safetensors_state(store / "dpo" / "model")


def _assert_close(a: dict[int, float], b: dict[int, float], weights_a: dict[str, torch.Tensor],
                  weights_b: dict[str, torch.Tensor]) -> None:
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-5), f"step {step}: {a[step]} vs {b[step]}"
    assert weights_a.keys() == weights_b.keys()
    worst = max(float((weights_a[k] - weights_b[k]).abs().max()) for k in weights_a)
    assert worst < 1e-5, worst


def test_world_size_and_accumulation_invariance(tmp_path: Path) -> None:
    data_uri = str(jobs.small_colors(tmp_path / "data"))
    two_ranks, weights_two = _run(tmp_path, "ws2", data_uri, procs=2, micro=2, accumulation=1)
    one_rank, weights_one = _run(tmp_path, "ws1", data_uri, procs=1, micro=4, accumulation=1)
    accumulated, weights_accumulated = _run(tmp_path, "ga2", data_uri, procs=1, micro=2, accumulation=2)
    _assert_close(one_rank, two_ranks, weights_one, weights_two)
    _assert_close(one_rank, accumulated, weights_one, weights_accumulated)
    assert one_rank[1] == pytest.approx(0.6931471805599453, abs=1e-6)  # log 2 at the start (π = π_ref)


def _workers(parent: psutil.Process) -> dict[int, psutil.Process]:
    """RANK -> worker process among the children of a `mmalign run`."""
    found = {}
    for child in parent.children(recursive=True):
        try:
            if ("mmalign.cli" in " ".join(child.cmdline()) and "train" in child.cmdline()
                    and not jobs.is_forked_worker(child)):
                found[int(child.environ().get("RANK", "-1"))] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_sigkill_a_rank_then_resume_from_s3_is_exact(tmp_path: Path) -> None:
    require_weed()
    data_uri = str(jobs.small_colors(tmp_path / "data"))
    reference, reference_weights = _run(tmp_path, "uninterrupted", data_uri, procs=2, micro=2, accumulation=1)

    with S3Server(tmp_path / "s3") as s3:
        env = jobs.run_env(s3.env(), scratch=tmp_path / "scratch-s3")
        job = _dpo_job(tmp_path / "killed.yaml", data_uri, s3.uri("killed/"), procs=2, micro=2, accumulation=1,
                       every=2, async_upload=True)
        process = jobs.start("run", str(job), "--local", env=env)
        lines: list[str] = []
        killed = False
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            report = jobs.progress(line, "dpo")
            # kill once a checkpoint is committed (async upload: a step or two after it was saved)
            if report and report[0].event == "step" and report[0].checkpoint and not killed:
                deadline = time.monotonic() + 10
                while 1 not in (workers := _workers(psutil.Process(process.pid))) and time.monotonic() < deadline:
                    time.sleep(0.1)
                os.kill(workers[1].pid, signal.SIGKILL)  # rank 1, mid-run
                killed = True
        code = process.wait(timeout=120)
        first_output = "".join(lines)
        assert killed, first_output[-4000:]
        assert code == 128 + signal.SIGKILL, first_output[-4000:]  # the worker's own status, not torchrun's 1
        before_kill = jobs.losses(first_output, "dpo")
        assert max(before_kill) < STEPS, "the kill came too late to interrupt the run"

        from mmalign.trainer import s3client, storage, transfer

        for key, value in s3.env().items():
            os.environ[key] = value
        s3client.configure()
        marker = storage.read_json(s3.uri("killed/dpo/checkpoints/latest"))
        assert marker["step"] in (2, 4, 6) and marker["world_size"] == 2

        resumed_output = jobs.check(jobs.mmalign("run", str(job), "--local", env=env, timeout=300))
        start = jobs.progress(resumed_output, "dpo")[0]
        assert start.event == "start" and start.step == marker["step"]  # continues at the same step
        after = jobs.losses(resumed_output, "dpo")
        assert sorted(after) == list(range(marker["step"] + 1, STEPS + 1))

        folder = tmp_path / "resumed-model"
        transfer.download_prefix(s3.uri("killed/dpo/model/"), folder)
        resumed_weights = jobs.safetensors_state(folder)

    for step, loss in {**before_kill, **after}.items():
        assert loss == reference[step], f"step {step}: {loss} != {reference[step]}"
    assert all(torch.equal(reference_weights[k], resumed_weights[k]) for k in reference_weights)
