"""Evaluation as part of a job, through `mmalign run --local` (torchrun, 2 processes, gloo, ZeRO-2):
the reward stage scores `evalData` (RewardBench layout, categories from the media folders) after
training, the dpo stage measures the policy's win rate over the reference judged by that reward
model; both land in metrics.json and on the stage's last progress line (what the operator copies into
status.stages.<stage>.metrics)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mmalign.trainer import builtin
from tests.trainer import jobs


def eval_set(folder: Path, first_query: int, queries: int) -> Path:
    """Queries `first_query`.. of builtin://synthetic-colors (not the training ones) as a JSONL file
    with its images beside it, in folders named after their category (short/, long/, mcq/)."""
    full = folder / "full"
    builtin.export_dataset("synthetic-colors", full, seed=0)
    rows = [json.loads(line) for line in (full / "pairs.jsonl").read_text().splitlines()]
    order = list(dict.fromkeys(row["id"].rsplit("_", 1)[0] for row in rows))
    wanted = set(order[first_query : first_query + queries])
    subset = [row for row in rows if row["id"].rsplit("_", 1)[0] in wanted]
    for row in subset:
        (folder / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        if not (folder / row["image"]).exists():
            os.link(full / row["image"], folder / row["image"])
    target = folder / "eval.jsonl"
    target.write_text("".join(json.dumps(row) + "\n" for row in subset))
    return target


def test_reward_eval_data_and_dpo_win_rate_in_metrics_and_progress(tmp_path: Path) -> None:
    data_file = jobs.small_colors(tmp_path / "data")  # 16 queries x 3 pairs; 4 queries held out
    eval_file = eval_set(tmp_path / "eval", first_query=16, queries=6)  # 18 pairs, none trained on
    store = tmp_path / "store"
    job = jobs.write_job(
        tmp_path / "job.yaml", data_uri=str(data_file), storage_uri="s3://unused/", procs=2,
        stages={
            "reward": {"learningRate": 1e-3, "maxSteps": 2, "microBatchSize": 2,
                       "evalData": str(eval_file), "evalMaxPairs": 10},  # whole queries: 3 x 3 pairs
            "dpo": {"learningRate": 1e-3, "maxSteps": 2, "microBatchSize": 2, "evalEverySteps": 1,
                    "winRate": {"maxPrompts": 3, "maxNewTokens": 8}},
        },
    )
    env = jobs.run_env(scratch=tmp_path / "scratch")
    result = jobs.mmalign("run", str(job), "--local", "--storage", store.as_uri() + "/", env=env, timeout=400)
    output = jobs.check(result)

    # reward: Acc/Acc+ overall and per category of the kept queries, bounded to whole queries
    rows = [json.loads(line) for line in eval_file.read_text().splitlines()][:9]
    categories = {row["image"].split("/")[0] for row in rows}
    reward = json.loads((store / "reward" / "metrics.json").read_text())
    table = reward["eval_data"]
    assert table["overall"]["pairs"] == 9 and table["overall"]["queries"] == 3
    assert set(table) == {"overall", *categories}
    assert sum(table[c]["pairs"] for c in categories) == 9
    assert 0 <= table["overall"]["acc"] <= 1 and 0 <= table["overall"]["acc_plus"] <= 1
    assert reward["eval_data_acc"] == table["overall"]["acc"]
    last = jobs.progress(output, "reward")[-1]
    assert last.event == "end"
    assert last.metrics["eval_data_acc"] == reward["eval_data_acc"]
    assert last.metrics["eval_data_acc_plus"] == reward["eval_data_acc_plus"]

    # dpo: the policy's win rate over the reference on 3 held-out prompts, judged by the reward model
    dpo = json.loads((store / "dpo" / "metrics.json").read_text())
    detail = dpo["win_rate_eval"]
    assert detail["prompts"] == 3 and detail["wins"] + detail["ties"] + detail["losses"] == 3
    assert dpo["win_rate"] == (detail["wins"] + 0.5 * detail["ties"]) / 3
    assert detail["reward_model"] == f"{store.as_uri()}/reward/model/"
    last = jobs.progress(output, "dpo")[-1]
    assert last.event == "end" and last.metrics["win_rate"] == dpo["win_rate"]

    # dpo evalEverySteps 1: held-out implicit-reward accuracy at step 1 in progress, the curve in metrics.json
    evals = [p for p in jobs.progress(output, "dpo") if p.event == "eval"]
    assert [p.step for p in evals] == [1] and 0 <= evals[0].metrics["eval_reward_accuracy"] <= 1, evals
    curve = dpo["eval_curve"]
    assert [p["step"] for p in curve] == [0, 1, 2], curve
    assert curve[0]["eval_reward_accuracy"] == dpo["eval_reward_accuracy_initial"]
    assert curve[1]["eval_reward_accuracy"] == evals[0].metrics["eval_reward_accuracy"]
    assert curve[2]["eval_reward_accuracy"] == dpo["eval_reward_accuracy"]
