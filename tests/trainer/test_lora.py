"""LoRA through the three stages, end to end (`mmalign run --local`: torchrun, 2 processes, gloo, ZeRO-2)
on 16 queries of synthetic-colors: reward (LoRA, critiques) -> score (loads the merged reward model) ->
dpo (LoRA, `reference: model`, i.e. the policy with its adapters disabled), vision tower frozen.

What a user relies on: every merged export is a plain Hugging Face folder that transformers loads; the
frozen parts (vision tower, projector under LoRA, layers without adapters) are exactly the base model's;
the adapted layers changed; a LoRA run that restarts from its checkpoint (ZeRO-3, 2 ranks) ends with
the same weights.

Each test takes ~95 s on 2 CPU cores (measured 2026-12-01): 3 and 2 torchrun launches, each paying the
deepspeed/transformers import, as in test_stages.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from tests.trainer import jobs

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def _load(folder: Path) -> dict[str, torch.Tensor]:
    import transformers

    model = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def _base() -> dict[str, torch.Tensor]:
    from mmalign.trainer import models

    model, _ = models.load_model("builtin://tiny-qwen2-vl")
    return {k: v.detach() for k, v in model.state_dict().items()}


def _changed(trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> set[str]:
    assert trained.keys() == base.keys()
    return {k for k in base if not torch.equal(trained[k], base[k])}


def _stages(dpo_steps: int = 3) -> dict[str, Any]:
    return {
        "reward": {"critique": True, "learningRate": 1e-2, "maxSteps": 3, "microBatchSize": 2, "lora": LORA},
        "score": {"maxNewTokens": 4, "batchSize": 8, "shardPairs": 24},
        "dpo": {
            "beta": 0.1,
            "reference": "model",
            "learningRate": 1e-2,
            "maxSteps": dpo_steps,
            "microBatchSize": 2,
            "warmupRatio": 0.0,
            "lora": {**LORA, "targetModules": ["q_proj", "v_proj"]},
        },
    }


def test_lora_runs_reward_score_dpo_and_exports_merged_models(tmp_path: Path) -> None:
    data_file = jobs.small_colors(tmp_path / "data")
    store = tmp_path / "store"
    job = jobs.write_job(
        tmp_path / "job.yaml",
        data_uri=str(data_file),
        storage_uri="s3://unused/",
        procs=2,
        checkpoint={"everySteps": 2, "keepLast": 1, "asyncUpload": False},
        stages=_stages(),
    )
    env = jobs.run_env(scratch=tmp_path / "scratch")
    output = jobs.check(
        jobs.mmalign("run", str(job), "--local", "--storage", store.as_uri() + "/", env=env, timeout=500)
    )
    assert "reward: trainable" in output and "dpo: trainable" in output
    base = _base()

    # reward: merged into a plain folder + the score head; the vision tower and projector untouched
    reward_folder = store / "reward" / "model"
    assert (reward_folder / "score_head.safetensors").exists() and (reward_folder / "_complete.json").exists()
    assert not any("lora_" in k for k in jobs.safetensors_state(reward_folder))
    changed = _changed(_load(reward_folder), base)
    assert changed and all(".language_model." in k for k in changed)
    assert any(k.endswith("self_attn.q_proj.weight") for k in changed)
    assert not any(".visual." in k for k in changed)

    # score: read the LoRA-trained reward model like any other
    manifest = json.loads((store / "score" / "scored" / "manifest.json").read_text())
    assert manifest["pairs"] == 48 and manifest["critique"] is True

    # dpo: only the adapted layers (q_proj, v_proj of the language model) differ from the base model;
    # no reference copy, no reference log-probs pass
    changed = _changed(_load(store / "dpo" / "model"), base)
    assert changed and all(
        k.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight")) for k in changed
    )
    assert not (store / "dpo" / "reference-logps").exists()
    metrics = json.loads((store / "dpo" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["reference"] == "model"
    assert json.loads((store / "dpo" / "checkpoints" / "latest").read_text())["step"] == 3


def test_lora_dpo_resumed_from_its_checkpoint_ends_with_the_same_weights(tmp_path: Path) -> None:
    """A 4-step LoRA DPO run (checkpoints at steps 2 and 4), then rolled back to its step-2 checkpoint
    as a crash after that commit would leave it (later checkpoint and the export gone) and run again:
    steps 3 and 4 give the same losses and the export is bit-identical. This time under ZeRO-3 with
    gradient checkpointing on 2 ranks, with the precomputed reference (a pass over the base model
    before the adapters exist) and the adapter export (gathered from the partitions)."""
    data_file = jobs.small_colors(tmp_path / "data", queries=8)
    stages = {
        "dpo": {
            **_stages(dpo_steps=4)["dpo"],
            "reference": "precomputed",
            "lora": {**LORA, "export": "adapter"},
        }
    }
    store = tmp_path / "store"
    job = jobs.write_job(
        tmp_path / "job.yaml",
        data_uri=str(data_file),
        storage_uri="s3://unused/",
        procs=2,
        zero_stage=3,  # the 7B example's engine: partitioned base weights and adapters, per-rank shards
        gradient_checkpointing=True,
        checkpoint={"everySteps": 2, "keepLast": 2, "asyncUpload": False},
        stages=stages,
    )
    env = jobs.run_env(scratch=tmp_path / "scratch")

    def run() -> str:
        return jobs.check(
            jobs.mmalign("run", str(job), "--local", "--storage", store.as_uri() + "/", env=env, timeout=300)
        )

    straight = jobs.losses(run(), "dpo")
    exported = {k: v.clone() for k, v in jobs.safetensors_state(store / "dpo" / "model").items()}
    assert sorted(straight) == [1, 2, 3, 4]
    assert exported and all("lora_" in k for k in exported)  # export: adapter: only the adapters
    assert any(v.abs().sum() > 0 for k, v in exported.items() if "lora_B" in k)  # trained (B starts at 0)

    checkpoints = store / "dpo" / "checkpoints"
    marker = json.loads((checkpoints / "latest").read_text())
    step_2, step_4 = checkpoints / "step-00000002", checkpoints / "step-00000004"
    assert marker["step"] == 4 and step_2.exists()
    # the marker the checkpointer wrote at step 2: the files every rank reported in its _done object
    files = [
        f for done in sorted((step_2 / "_done").glob("*.json")) for f in json.loads(done.read_text())["files"]
    ]
    assert files
    marker.update(
        step=2,
        tag=step_2.name,
        files=sorted(files, key=lambda f: f["name"]),
        uri=marker["uri"].replace(step_4.name, step_2.name),
    )
    (checkpoints / "latest").write_text(json.dumps(marker))
    shutil.rmtree(step_4)
    (store / "dpo" / "model" / "_complete.json").unlink()

    again = run()
    resumed = jobs.losses(again, "dpo")
    assert jobs.progress(again, "dpo")[0].step == 2 and sorted(resumed) == [3, 4]
    assert resumed == {step: straight[step] for step in (3, 4)}
    weights = jobs.safetensors_state(store / "dpo" / "model")
    assert weights.keys() == exported.keys()
    assert all(torch.equal(weights[k], exported[k]) for k in weights)
