"""stages.dpo.maxTokensPerBatch end to end (tiny Qwen2-VL, small-colors pairs with images, 1 process,
CPU): micro-batches cut by the token budget instead of a pair count, packed rows, the reference
pre-pass grouped the same way; the run trains the steps the schedule says, starting at log 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.trainer import jobs


def test_a_token_budget_run_trains_the_scheduled_steps(tmp_path: Path) -> None:
    data_uri = str(jobs.small_colors(tmp_path / "data", queries=8))
    store = tmp_path / "store"
    job = jobs.write_job(
        tmp_path / "job.yaml",
        data_uri=data_uri,
        storage_uri=store.as_uri() + "/",
        procs=1,
        stages={
            "dpo": {
                "beta": 0.1,
                "learningRate": 1e-3,
                "maxTokensPerBatch": 600,
                "gradientAccumulation": 2,
                "warmupRatio": 0.0,
                "winRate": {"enabled": False},
            }
        },
    )
    output = jobs.check(
        jobs.mmalign("run", str(job), "--local", env=jobs.run_env(scratch=tmp_path / "scratch"), timeout=600)
    )
    trajectory = jobs.losses(output, "dpo")
    metrics = json.loads((store / "dpo" / "metrics.json").read_text())
    assert sorted(trajectory) == list(range(1, metrics["steps"] + 1)) and metrics["steps"] >= 1
    assert trajectory[1] == pytest.approx(0.6931471805599453, abs=1e-6)  # log 2 at the start (π = π_ref)
    # 600 packed tokens hold several of these ~150-token pairs: fewer steps than one pair per micro-batch
    assert metrics["steps"] < metrics["train_pairs"] // 2
