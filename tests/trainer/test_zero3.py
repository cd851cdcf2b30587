"""ZeRO-3 + gradient checkpointing (the 7B example's settings) on CPU: 2 torchrun ranks, gloo.

One job, critique reward model (score head + LM head under ZeRO-3) and DPO with a frozen reference model
(`reference: model`, ZeRO-3-sharded), 4 steps each, a checkpoint every 2 steps, run three times:

1. ZeRO-2 without gradient checkpointing: the baseline;
2. ZeRO-3 with gradient checkpointing: every step's loss equals the baseline's (2e-5 relative; measured
   ≤ 2e-7), and so do the exported folders, loaded back (2e-5 absolute on every weight after 4 AdamW
   steps of lr 1e-3; measured ≤ 1.4e-6: the ZeRO stages sum and clip in a different order, and Adam's
   normalisation amplifies that rounding where the chosen and rejected rows' gradients nearly cancel,
   e.g. in the vision tower);
3. `latest` of both stages moved back to the step-2 checkpoint and the outputs deleted, the same ZeRO-3
   job again: it resumes at step 2 and reproduces steps 3-4 and the exported weights EXACTLY.

centeringWeight > 0 gives the score head's output bias a gradient: without it the BT loss does not
depend on that bias, its gradient is rounding noise and Adam turns the noise into ±lr steps (measured
1.5e-4 apart between ZeRO stages).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.trainer import jobs

STEPS = 4
STAGES = {
    "reward": {"critique": True, "centeringWeight": 0.01, "learningRate": 1e-3, "maxSteps": STEPS,
               "microBatchSize": 2},
    "dpo": {"beta": 0.1, "reference": "model", "learningRate": 1e-3, "maxSteps": STEPS, "microBatchSize": 2},
}


def _run(job: Path, tmp_path: Path) -> str:
    env = jobs.run_env(scratch=tmp_path / "scratch")
    return jobs.check(jobs.mmalign("run", str(job), "--local", env=env, timeout=600))


def _exported(store: Path | None) -> dict[str, dict[str, torch.Tensor]]:
    """The two exported folders as the next stage / a user loads them (None: the initial weights)."""
    from mmalign.trainer import models

    reward, _ = models.load_reward_model(str(store / "reward" / "model") if store else "builtin://tiny-qwen2-vl")
    policy, _ = models.load_model(str(store / "dpo" / "model") if store else "builtin://tiny-qwen2-vl")
    return {"reward": reward.state_dict(), "dpo": policy.state_dict()}


def _roll_back(checkpoints: Path, step: int) -> None:
    """Point `latest` at an older complete checkpoint, as if the run had died right after committing it
    (the marker as Checkpointer._commit writes it, from the ranks' `_done` records of that step)."""
    marker = json.loads((checkpoints / "latest").read_text())
    tag = f"step-{step:08d}"
    files: dict[str, Any] = {}
    for done in sorted((checkpoints / tag / "_done").glob("rank-*.json")):
        files.update({f["name"]: f for f in json.loads(done.read_text())["files"]})
    marker.update(step=step, tag=tag, uri=marker["uri"].replace(marker["tag"], tag),
                  files=[files[name] for name in sorted(files)])
    (checkpoints / "latest").write_text(json.dumps(marker))


def test_zero3_with_gradient_checkpointing_matches_zero2_and_resumes_exactly(tmp_path: Path) -> None:
    data_uri = str(jobs.small_colors(tmp_path / "data", queries=8))  # 24 pairs: 18 train, 6 held out
    outputs, stores, job = {}, {}, {}
    for name, zero_stage in (("zero2", 2), ("zero3", 3)):
        stores[name] = tmp_path / name
        job[name] = jobs.write_job(
            tmp_path / f"{name}.yaml", data_uri=data_uri, storage_uri=stores[name].as_uri() + "/", procs=2,
            zero_stage=zero_stage, gradient_checkpointing=zero_stage == 3, stages=STAGES,
            checkpoint={"everySteps": 2, "keepLast": 2, "asyncUpload": True},
        )
        outputs[name] = _run(job[name], tmp_path)
    assert "gradient checkpointing asked for" not in outputs["zero3"]  # engine.py found the HF model

    # ZeRO-3 really partitioned the model: every rank wrote its own model-state shard
    for stage in STAGES:
        marker = json.loads((stores["zero3"] / stage / "checkpoints" / "latest").read_text())
        names = {f["name"] for f in marker["files"]}
        assert marker["step"] == STEPS and {"zero_pp_rank_0_mp_rank_00_model_states.pt",
                                            "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= names, names
        assert "mp_rank_00_model_states.pt" not in names

    # ZeRO-3 + gradient checkpointing == ZeRO-2: losses and exported weights
    trajectories = {name: {stage: jobs.losses(out, stage) for stage in STAGES} for name, out in outputs.items()}
    for stage in STAGES:
        assert sorted(trajectories["zero2"][stage]) == list(range(1, STEPS + 1))
        for step, loss in trajectories["zero2"][stage].items():
            assert trajectories["zero3"][stage][step] == pytest.approx(loss, rel=2e-5), (stage, step)
    assert trajectories["zero3"]["dpo"][1] == pytest.approx(0.6931471805599453, abs=1e-6)  # log 2: π = π_ref
    weights = {name: _exported(store) for name, store in stores.items()}
    for stage in STAGES:
        baseline, zero3 = weights["zero2"][stage], weights["zero3"][stage]
        assert baseline.keys() == zero3.keys()
        worst = max((float((baseline[k] - zero3[k]).abs().max()), k) for k in baseline)
        assert worst[0] < 2e-5, (stage, worst)
    assert any(k.startswith("score_head.") for k in weights["zero3"]["reward"])
    for stage, initial in _exported(None).items():  # the exports hold trained weights, not initial ones
        assert max(float((weights["zero3"][stage][k] - v).abs().max()) for k, v in initial.items()) > 1e-3

    # resume: back to the step-2 checkpoint of both stages, outputs gone; the same job again
    for stage in STAGES:
        _roll_back(stores["zero3"] / stage / "checkpoints", 2)
        shutil.rmtree(stores["zero3"] / stage / "model")
    resumed = _run(job["zero3"], tmp_path)
    for stage in STAGES:
        start = jobs.progress(resumed, stage)[0]
        assert start.event == "start" and start.step == 2, start
        after = jobs.losses(resumed, stage)
        assert sorted(after) == [3, 4], after
        for step, loss in after.items():
            assert loss == trajectories["zero3"][stage][step], (stage, step)
    resumed_weights = _exported(stores["zero3"])
    for stage in STAGES:
        assert all(torch.equal(weights["zero3"][stage][k], v) for k, v in resumed_weights[stage].items()), stage


def test_gradient_checkpointing_recomputes_layers_with_identical_gradients() -> None:
    """The engine's switch reaches the HF model inside the stage's wrapper, and our forward path
    (logprobs.forward_hidden calls the backbone directly) then recomputes every vision block and
    decoder layer in backward, with bit-identical gradients. (On the GPU it was once silently off.)"""
    from PIL import Image

    from mmalign.trainer import collate, engine, models
    from mmalign.trainer.stages.reward import RewardForward

    image = Image.new("RGB", (48, 40), (220, 30, 30))
    examples = [collate.Example("What colour is the image?", "Red.", "Blue, I think.", [image],
                                "Correct.", "Wrong: it is red.")]

    def forward_backward(checkpointing: bool) -> tuple[list[str], dict[str, torch.Tensor]]:
        model, processor = models.load_reward_model("builtin://tiny-qwen2-vl", seed=0)
        wrapper = RewardForward(model)
        if checkpointing:
            engine._enable_gradient_checkpointing(wrapper)
        wrapper.train()
        calls: list[str] = []
        # Hooks on the FIRST linear of a block: checkpoint recomputation stops early once the saved
        # tensors backward needs exist again, so hooks at the end of a block never fire twice.
        for name, module in wrapper.named_modules():
            if name.endswith(("language_model.layers.0.mlp.gate_proj", "visual.blocks.0.mlp.fc1")):
                module.register_forward_hook(lambda *_, name=name: calls.append(name.split(".")[-4]))
        scores, critique_logps, _ = wrapper(collate.Collator(processor).reward(examples, critique=True))
        (scores.sum() + critique_logps.sum()).backward()
        return calls, {n: p.grad for n, p in wrapper.named_parameters() if p.grad is not None}

    plain_calls, plain_grads = forward_backward(False)
    checkpointed_calls, checkpointed_grads = forward_backward(True)
    assert sorted(plain_calls) == ["blocks", "layers"]
    assert sorted(checkpointed_calls) == ["blocks", "blocks", "layers", "layers"]  # recomputed in backward
    assert plain_grads.keys() == checkpointed_grads.keys() and len(plain_grads) > 40
    assert all(torch.equal(plain_grads[k], checkpointed_grads[k]) for k in plain_grads)
