"""Outputs are reused only for the same identity (trainer/identity.py), through `mmalign run --local`:
a job re-created with another `stages.dpo.beta` under the same storage retrains dpo and keeps reward and
score; the same job again retrains nothing; an image rewritten under the same name retrains everything."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from tests.trainer import jobs

STAGES = {
    "reward": {"critique": True, "learningRate": 1e-3, "maxSteps": 2, "microBatchSize": 2},
    "score": {"maxNewTokens": 4, "batchSize": 8, "shardPairs": 12},
    "dpo": {"beta": 0.1, "dynamicRewardScaling": {"w": 0.5, "k": 0.5}, "learningRate": 1e-3, "maxSteps": 2,
            "microBatchSize": 2},
}


def steps(output: str, stage: str) -> int:
    return sum(1 for r in jobs.progress(output, stage) if r.event == "step")


def test_a_changed_beta_retrains_dpo_only(tmp_path: Path) -> None:
    data_file = jobs.small_colors(tmp_path / "data", queries=8)
    store = tmp_path / "store"
    env = jobs.run_env(scratch=tmp_path / "scratch")

    def run(beta: float, *only: str) -> str:
        stages = {**STAGES, "dpo": {**STAGES["dpo"], "beta": beta}}
        job = jobs.write_job(tmp_path / "job.yaml", data_uri=str(data_file), storage_uri="s3://unused/", procs=1,
                             stages=stages)
        subset = ["--stages", ",".join(only)] if only else []
        result = jobs.mmalign("run", str(job), "--local", "--storage", store.as_uri() + "/", *subset, env=env,
                              timeout=400)
        return jobs.check(result)

    first = run(0.1)
    assert (steps(first, "reward"), steps(first, "dpo")) == (2, 2) and steps(first, "score") > 0
    reward_complete = (store / "reward" / "model" / "_complete.json").read_text()
    scored = store / "score" / "scored"
    shards = {p.name: p.stat().st_mtime_ns for p in scored.glob("shard-*")}
    recorded = json.loads((store / "dpo" / "model" / "_complete.json").read_text())["identity"]
    assert recorded["stages.dpo.beta"] == 0.1 and recorded["scoredPairs"]

    changed = run(0.2)
    assert steps(changed, "dpo") == 2  # dpo retrained ...
    assert "changed: stages.dpo.beta" in changed
    notices = {n for r in jobs.progress(changed, "dpo") for n in r.notices}  # the operator's Events
    assert any("dpo/model/ was made with other inputs or parameters (changed: stages.dpo.beta); recomputing it"
               in n for n in notices), notices  # and the checkpoints of the old β, started over
    assert notices and all("(changed: stages.dpo.beta)" in n for n in notices), notices
    assert steps(changed, "reward") == 0
    assert "reward: " in changed and "is complete for the same inputs and parameters" in changed
    assert steps(changed, "score") == 0  # ... reward and score reused
    assert (store / "reward" / "model" / "_complete.json").read_text() == reward_complete
    assert {p.name: p.stat().st_mtime_ns for p in scored.glob("shard-*")} == shards
    assert "reference log-probs" not in changed  # same pairs and base model: the reference is reused
    assert json.loads((store / "dpo" / "model" / "_complete.json").read_text())["identity"]["stages.dpo.beta"] == 0.2
    assert json.loads((store / "dpo" / "metrics.json").read_text())["steps"] == 2

    again = run(0.2)
    assert sum(steps(again, stage) for stage in ("reward", "score", "dpo")) == 0
    assert "changed:" not in again

    image = data_file.parent / json.loads(data_file.read_text().splitlines()[0])["image"]
    image.unlink()  # a hard link into the full export: replace it, with other pixels, under the same name
    Image.new("RGB", (32, 32), (1, 2, 3)).save(image)
    redrawn = run(0.2, "reward")  # one stage shows it: every stage identity has `media`
    assert steps(redrawn, "reward") == 2 and "(changed: media); recomputing it" in redrawn
