"""Evaluation as part of a job (trainer/evaluation.py): evalData bounded to whole queries, Acc/Acc+ per
category, the win rate with ties as halves, the spec fields, and the numbers reaching the job's status."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from mmalign.api.progress import ProgressReport, parse_line
from mmalign.api.spec import AlignmentJobManifest, AlignmentJobSpec
from mmalign.trainer import collate, data, evaluation, identity, media, metrics, tiny
from mmalign.trainer.context import Context
from tests.unit.test_identity import ONE_RANK
from tests.unit.test_operator_status import World

BENCH = Path(__file__).resolve().parents[1] / "data" / "mm_reward_bench.jsonl"


def test_eval_data_is_bounded_to_whole_queries_in_file_order() -> None:
    pairs, _ = data.read_pairs(str(BENCH))  # 170 pairs, 46 queries, RewardBench layout
    kept = evaluation.whole_queries(pairs, 20)
    queries = list(dict.fromkeys(p.query_id for p in kept))
    assert len(kept) <= 20 and kept == pairs[: len(kept)]
    assert all(sum(p.query_id == q for p in pairs) == sum(p.query_id == q for p in kept) for q in queries)
    nxt = pairs[len(kept)].query_id
    assert len(kept) + sum(p.query_id == nxt for p in pairs) > 20  # the next query would not have fit
    assert evaluation.whole_queries(pairs, 1) == [p for p in pairs if p.query_id == pairs[0].query_id]
    assert evaluation.whole_queries(pairs, 10_000) == pairs


def test_acc_and_acc_plus_per_category_from_the_media_folders() -> None:
    pairs, _ = data.read_pairs(str(BENCH))
    # a reward model that gets every pair right except the first pair of each query
    first = {p.query_id: p.uid for p in reversed(pairs)}
    rows = [(p.query_id, p.category, 0.0 if first[p.query_id] == p.uid else 1.0, 0.5) for p in pairs]
    result = evaluation.eval_data_metrics(metrics.reward_bench(rows))
    table = result["eval_data"]
    assert list(table) == ["overall", "long", "mcq", "safety", "short", "video"]
    assert {c: table[c]["pairs"] for c in list(table)[1:]} == {"long": 37, "mcq": 42, "safety": 32, "short": 34,
                                                             "video": 25}
    assert table["mcq"]["acc"] == (42 - 10) / 42 and table["mcq"]["acc_plus"] == 0.0  # every query has a miss
    assert result["eval_data_acc"] == (170 - 46) / 170 and result["eval_data_acc_plus"] == 0.0
    assert result["eval_data_pairs"] == 170
    # the status gets floats only (the progress line drops the rest): overall numbers, not the table
    assert {k for k, v in result.items() if isinstance(v, float)} == {"eval_data_acc", "eval_data_acc_plus"}


def test_win_rate_counts_ties_as_half_and_identical_answers_as_ties() -> None:
    rows = [
        ("a red cat", "a cat", 2.0, 1.0),  # win
        ("a dog", "a cat", 0.0, 1.0),  # loss
        ("same", "same", 3.0, 1.0),  # the same answer: a tie, whatever the scores
        ("x", "y", 0.5, 0.5),  # equal rewards: a tie
    ]
    assert evaluation.win_rate(rows) == {"win_rate": 0.5, "wins": 1, "ties": 2, "losses": 1, "prompts": 4}
    assert evaluation.win_rate(rows[:1])["win_rate"] == 1.0
    assert evaluation.win_rate([])["win_rate"] == 0.5


def test_prompt_rows_are_the_prompt_alone_left_padded_one_per_pair() -> None:
    collator = collate.Collator(tiny.build_processor("text"))
    items = [collate.Example("What colour is it?", "Red.", "Blue."),
             collate.Example("A much longer question about the colour of the square?", "Red.", "Blue.")]
    batch = collator.prompts(items)
    assert batch.rows == 2 and batch.repeats == 1 and not batch.response_mask.any()
    assert batch.attention_mask[:, -1].all() and not batch.attention_mask[0, 0]  # left padding
    tokenizer = collator.tokenizer
    for row, item in enumerate(items):
        ids = batch.input_ids[row][batch.attention_mask[row].bool()]
        messages = [{"role": "user", "content": item.prompt}]
        # ends in the generation prompt: what generate continues is the assistant's answer
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_one_prompt_per_held_out_query() -> None:
    pairs, _ = data.read_pairs(str(BENCH))
    prompts = evaluation.one_prompt_per_query(pairs, 5)
    assert [p.query_id for p in prompts] == list(dict.fromkeys(p.query_id for p in pairs))[:5]
    assert len(evaluation.one_prompt_per_query(pairs, 1000)) == 46


BASE = {
    "model": {"uri": "builtin://tiny-qwen2-vl"}, "data": {"uri": "builtin://synthetic-colors"},
    "storage": {"uri": "s3://b/j/"}, "stages": {"reward": {}, "dpo": {}},
}


def test_defaults_and_evaluation_fields_do_not_change_what_a_stage_trains() -> None:
    spec = AlignmentJobSpec.model_validate(BASE)
    assert spec.stages.reward is not None and spec.stages.dpo is not None
    assert spec.stages.reward.eval_data is None and spec.stages.reward.eval_max_pairs == 1024
    settings = spec.stages.dpo.win_rate
    assert settings.enabled and settings.max_prompts == 16 and settings.max_new_tokens == 32
    other = copy.deepcopy(BASE)
    other["stages"] = {"reward": {"evalData": "s3://b/bench.jsonl", "evalMaxPairs": 8},
                       "dpo": {"winRate": {"enabled": False}}}
    changed = AlignmentJobSpec.model_validate(other)
    pairs, _ = data.read_pairs(str(BENCH))
    for stage in ("reward", "dpo"):  # a trained model is reused when only the evaluation changes
        assert not identity.changed(identity.STAGES[stage](spec, pairs), identity.STAGES[stage](changed, pairs))


def test_final_evaluation_numbers_reach_the_stage_status() -> None:
    world = World()
    world.step()
    world.set("reward", "Running")
    world.step()
    world.set("reward", "Succeeded", 0)
    # the reward stage's last line (trainer/progress.py), read from the finished node-0 pod
    line = ProgressReport("reward", 4, 4, event="end", loss=0.3,
                          metrics={"eval_data_acc": 0.75, "eval_data_acc_plus": 0.5}).to_line()
    world.step(progress=parse_line(line))
    reward = world.status.stages.reward
    assert reward.phase == "Succeeded"
    assert reward.metrics == {"eval_data_acc": 0.75, "eval_data_acc_plus": 0.5, "loss": 0.3}
    world.run_stage("score")
    world.set("dpo", "Running")
    world.step()
    world.set("dpo", "Succeeded", 0)
    world.step(progress=ProgressReport("dpo", 4, 4, event="end", metrics={"win_rate": 0.625}))
    assert world.status.stages.dpo.metrics["win_rate"] == 0.625
    assert world.status.to_k8s()["stages"]["dpo"]["metrics"]["win_rate"] == 0.625


def _context(stages: dict[str, Any], data_source: dict[str, Any] | None = None, stage: str = "reward") -> Context:
    spec = {**copy.deepcopy(BASE), "stages": stages}
    if data_source:
        spec["data"].update(data_source)
    manifest = AlignmentJobManifest.model_validate(
        {"apiVersion": "mmalign.io/v1alpha1", "kind": "AlignmentJob", "metadata": {"name": "j"}, "spec": spec})
    return Context(manifest=manifest, stage=stage, dist=ONE_RANK)  # type: ignore[arg-type]


def test_eval_data_is_read_bounded_and_its_missing_media_named_before_training(tmp_path: Path) -> None:
    collator = collate.Collator(tiny.build_processor("text"), media.MediaLoader(missing="placeholder"))
    ctx = _context({"reward": {"evalData": str(BENCH), "evalMaxPairs": 12}})
    assert ctx.spec.stages.reward is not None
    with pytest.raises(data.DataError, match=r"stages.reward.evalData .*mm_reward_bench.jsonl: media not found "
                       r"for \d+ of \d+ pairs.*missingMedia: placeholder"):
        evaluation.load_eval_data(ctx, collator, ctx.spec.stages.reward)  # the real file ships without images
    ctx = _context({"reward": {"evalData": str(BENCH), "evalMaxPairs": 12}}, {"missingMedia": "placeholder"})
    assert ctx.spec.stages.reward is not None
    kept = evaluation.load_eval_data(ctx, collator, ctx.spec.stages.reward)
    assert 0 < len(kept) <= 12 and len({p.query_id for p in kept}) >= 2  # whole queries of the bound
    ctx = _context({"reward": {"evalData": str(tmp_path / "nothing.jsonl")}})
    assert ctx.spec.stages.reward is not None
    with pytest.raises(data.DataError, match="stages.reward.evalData: .*nothing.jsonl: no such file"):
        evaluation.load_eval_data(ctx, collator, ctx.spec.stages.reward)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "q_1", "prompt": "p", "chosen": "a"}) + "\n")
    ctx = _context({"reward": {"evalData": str(tmp_path / "bad.jsonl")}})
    assert ctx.spec.stages.reward is not None
    with pytest.raises(data.DataError, match="stages.reward.evalData: .*bad.jsonl:1"):
        evaluation.load_eval_data(ctx, collator, ctx.spec.stages.reward)


def test_win_rate_runs_only_with_a_judge_and_says_why_not() -> None:
    held_out, _ = data.read_pairs(str(BENCH))
    assert evaluation.skip_reason(_context({"reward": {}, "dpo": {}}, stage="dpo"), held_out) is None
    assert evaluation.judge_uri(_context({"reward": {}, "dpo": {}}, stage="dpo")) == "s3://b/j/reward/model/"
    alone = _context({"dpo": {}}, stage="dpo")
    assert "stages.dpo.winRate.rewardModel" in str(evaluation.skip_reason(alone, held_out))
    given = _context({"dpo": {"winRate": {"rewardModel": {"uri": "s3://models/rm/"}}}}, stage="dpo")
    assert evaluation.judge_uri(given) == "s3://models/rm/" and evaluation.skip_reason(given, held_out) is None
    off = _context({"reward": {}, "dpo": {"winRate": {"enabled": False}}}, stage="dpo")
    assert evaluation.skip_reason(off, held_out) == "stages.dpo.winRate.enabled is false"
    assert "evalFraction" in str(evaluation.skip_reason(_context({"reward": {}, "dpo": {}}, stage="dpo"), []))
