"""The three stages end to end through `mmalign run --local` (torchrun, 2 processes, gloo, ZeRO-2),
on a 48-pair image preference set (16 queries of synthetic-colors exported to PNG + JSONL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmalign.trainer import s3client, storage, transfer
from tests.s3_server import S3Server, require_weed
from tests.trainer import jobs


def test_pipeline_on_file_storage(tmp_path: Path) -> None:
    data_file = jobs.small_colors(tmp_path / "data")
    store = tmp_path / "store"
    job = jobs.write_job(
        tmp_path / "job.yaml", data_uri=str(data_file), storage_uri="s3://unused/", procs=2,
        checkpoint={"everySteps": 2, "keepLast": 1, "asyncUpload": True},
        stages={
            "reward": {"critique": True, "learningRate": 1e-3, "maxSteps": 4, "microBatchSize": 2,
                       "evalEverySteps": 2},
            "score": {"maxNewTokens": 8, "batchSize": 8, "shardPairs": 16},
            "dpo": {"beta": 0.1, "dynamicRewardScaling": {"w": 0.5, "k": 0.5}, "sftWeight": 0.25,
                    "learningRate": 1e-3, "maxSteps": 4, "microBatchSize": 2},
        },
    )
    env = jobs.run_env(scratch=tmp_path / "scratch")
    result = jobs.mmalign("run", str(job), "--local", "--storage", store.as_uri() + "/", env=env, timeout=400)
    output = jobs.check(result)
    assert f"{store.as_uri()}/reward/model/" in result.stdout and f"{store.as_uri()}/score/scored/" in result.stdout

    # reward: an HF folder + score head, complete; checkpoints: latest written by 2 ranks, keep 1
    reward_model = store / "reward" / "model"
    assert {"config.json", "model.safetensors", "score_head.safetensors", "mmalign_reward.json",
            "_complete.json"} <= {p.name for p in reward_model.iterdir()}
    marker = json.loads((store / "reward" / "checkpoints" / "latest").read_text())
    assert marker["step"] == 4 and marker["world_size"] == 2
    assert any(f["name"].startswith("zero_pp_rank_1") for f in marker["files"])
    assert sorted(p.name for p in (store / "reward" / "checkpoints").glob("step-*")) == ["step-00000004"]
    reward_metrics = json.loads((store / "reward" / "metrics.json").read_text())
    assert reward_metrics["eval_pairs"] == 12 and 0 <= reward_metrics["eval_acc"] <= 1

    # score: 48 pairs in shards of 16 (whatever the world size) in input order, manifest last,
    # the scored-pairs format
    scored = store / "score" / "scored"
    manifest = json.loads((scored / "manifest.json").read_text())
    assert manifest["shards"] == [f"shard-0000{i}-of-00003.jsonl" for i in range(3)]
    rows = [json.loads(line) for name in manifest["shards"] for line in (scored / name).read_text().splitlines()]
    original = [json.loads(line) for line in data_file.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in original]
    for row in rows:
        assert row["delta"] == pytest.approx(row["chosen_reward"] - row["rejected_reward"])
        assert isinstance(row["chosen_critique"], str) and isinstance(row["rejected_critique"], str)
        assert row["image"] and row["prompt"]

    # dpo: trained on the scored pairs with DRS; reference log-probs stored beside the data
    assert (store / "dpo" / "model" / "_complete.json").exists()
    assert (store / "dpo" / "reference-logps" / "manifest.json").exists()
    dpo_metrics = json.loads((store / "dpo" / "metrics.json").read_text())
    assert dpo_metrics["reference"] == "precomputed" and dpo_metrics["steps"] == 4

    # progress: every stage reported start ... end, with total and the committed checkpoint
    for stage, total in (("reward", 4), ("score", 48), ("dpo", 4)):
        reports = jobs.progress(output, stage)
        assert reports[0].event == "start" and reports[-1].event == "end", stage
        assert all(r.total == total for r in reports)
    assert jobs.progress(output, "dpo")[-1].checkpoint.endswith("dpo/checkpoints/step-00000004/")

    # a restart of `score` on ONE process, with a shard and the manifest gone, keeps the other shards
    # (written by 2 ranks) and redoes only the missing one, identically
    kept = {name: (scored / name).stat().st_mtime_ns for name in manifest["shards"] if name != "shard-00001-of-00003.jsonl"}
    lost = (scored / "shard-00001-of-00003.jsonl").read_text()
    (scored / "manifest.json").unlink()
    (scored / "shard-00001-of-00003.jsonl").unlink()
    one_process = jobs.write_job(tmp_path / "job-1.yaml", data_uri=str(data_file), storage_uri="s3://unused/",
                                 procs=1, stages=yaml.safe_load(job.read_text())["spec"]["stages"])
    result = jobs.mmalign("run", str(one_process), "--local", "--storage", store.as_uri() + "/", "--stages",
                          "score", env=env, timeout=200)
    assert "2 of 3 shards already written by an earlier attempt" in jobs.check(result)
    assert {name: (scored / name).stat().st_mtime_ns for name in kept} == kept
    redone = [json.loads(line) for line in (scored / "shard-00001-of-00003.jsonl").read_text().splitlines()]
    for row, before in zip(redone, [json.loads(line) for line in lost.splitlines()], strict=True):
        assert row["id"] == before["id"] and row["chosen_critique"] == before["chosen_critique"]
        assert row["chosen_reward"] == pytest.approx(before["chosen_reward"], abs=1e-5)
    rerun_manifest = json.loads((scored / "manifest.json").read_text())
    assert rerun_manifest["resumed_shards"] == 2 and rerun_manifest["world_size"] == 1


def test_scalar_reward_and_dpo_with_reference_model_on_s3(tmp_path: Path) -> None:
    """Data, images, checkpoints and models all in a real S3 server (SeaweedFS)."""
    require_weed()
    data_file = jobs.small_colors(tmp_path / "data")
    with S3Server(tmp_path / "s3") as s3:
        env = jobs.run_env(s3.env(), scratch=tmp_path / "scratch")
        env["MMALIGN_CACHE"] = str(tmp_path / "cache")  # downloaded models: a fresh cache per test
        for key, value in s3.env().items():
            import os

            os.environ[key] = value
        s3client.configure()
        transfer.upload_folder(data_file.parent, s3.uri("data/"))
        job = jobs.write_job(
            tmp_path / "job.yaml", data_uri=s3.uri("data/pairs.jsonl"), storage_uri=s3.uri("run/"), procs=2,
            checkpoint={"everySteps": 2, "keepLast": 2, "asyncUpload": False},
            stages={
                "reward": {"critique": False, "learningRate": 1e-3, "maxSteps": 3, "microBatchSize": 2},
                "dpo": {"beta": 0.1, "reference": "model", "learningRate": 1e-3, "maxSteps": 3,
                        "microBatchSize": 2},
            },
        )
        output = jobs.check(jobs.mmalign("run", str(job), "--local", env=env, timeout=400))
        assert storage.exists(s3.uri("run/reward/model/_complete.json"))
        assert storage.exists(s3.uri("run/dpo/model/model.safetensors"))
        assert storage.read_json(s3.uri("run/reward/model/mmalign_reward.json"))["critique"] is False
        marker = storage.read_json(s3.uri("run/dpo/checkpoints/latest"))
        assert marker["step"] == 3 and marker["world_size"] == 2
        steps = {o.relative.split("/")[0] for o in storage.list_prefix(s3.uri("run/dpo/checkpoints/"))}
        assert steps == {"identity.json", "latest", "step-00000002", "step-00000003"}  # identity: loop.resume
        assert not storage.exists(s3.uri("run/dpo/reference-logps/manifest.json"))  # reference: model
        assert jobs.progress(output, "dpo")[-1].event == "end"
