"""Learning happens: on builtin://synthetic-colors (288 pairs, 96 queries; 24 held-out queries = 72 pairs,
seed 0) with the tiny Qwen2-VL, one process, ZeRO-2, CPU:

* scalar reward model (BT loss, lr 3e-3, 12 epochs of micro-batch 8 = 324 steps, 10% warm-up):
  held-out RewardBench Acc goes from chance to >= 0.65 (measured 0.764, Acc+ 0.542). The prompt is the
  checkpoint's own Qwen2-VL template, default system prompt included: with it, the 162 steps that
  reached 0.708 without it reach only 0.528, so the schedule doubled. Chance is 0.5: the preference
  depends on the image's colour, every colour word is chosen for some images and rejected for others;
* DPO (fixed β 0.1, lr 1e-3, 2 epochs of micro-batch 8 = 54 steps, reference precomputed): held-out
  implicit-reward accuracy (h > 0) goes from ~0.1 at the start (h ≈ 0 up to rounding) to >= 0.65
  (measured 0.014 -> 0.764).

The critique variant learns too on a larger model (docs/trainer.md, GPU run: score-stage Acc 0.69 with
generated critiques after 20 steps of a 0.5B model); the tiny one needs far more steps than a test
should take to generate the right verdict from the image.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.trainer import jobs


def test_reward_model_and_dpo_learn_the_image_dependent_preference(tmp_path: Path) -> None:
    store = tmp_path / "store"
    job = jobs.write_job(
        tmp_path / "job.yaml", data_uri="builtin://synthetic-colors", storage_uri=store.as_uri() + "/", procs=1,
        seed=0,
        stages={
            # the tiny model's vision tower is random-init: frozen (the default, right for a pretrained
            # tower) it gives random features; measured at c26db48: held-out Acc 0.583 frozen, 0.708 not
            "reward": {"critique": False, "learningRate": 3e-3, "epochs": 12, "microBatchSize": 8,
                       "warmupRatio": 0.1, "freezeVisionTower": False},
            "dpo": {"beta": 0.1, "learningRate": 1e-3, "epochs": 2, "microBatchSize": 8,
                    "freezeVisionTower": False},
        },
    )
    env = jobs.run_env(scratch=tmp_path / "scratch")
    env["MMALIGN_PROGRESS_INTERVAL"] = "10"
    jobs.check(jobs.mmalign("run", str(job), "--local", env=env, timeout=900))

    reward = json.loads((store / "reward" / "metrics.json").read_text())
    assert reward["eval_pairs"] == 72 and reward["steps"] == 324
    assert reward["eval_acc"] >= 0.65, reward

    dpo = json.loads((store / "dpo" / "metrics.json").read_text())
    print(f"reward eval_acc {reward['eval_acc']:.3f} acc_plus {reward['eval_acc_plus']:.3f}; dpo eval reward "
          f"accuracy {dpo['eval_reward_accuracy_initial']:.3f} -> {dpo['eval_reward_accuracy']:.3f}")
    assert dpo["steps"] == 54
    assert dpo["eval_reward_accuracy"] >= 0.65, dpo
    assert dpo["eval_reward_accuracy"] > dpo["eval_reward_accuracy_initial"] + 0.3, dpo
