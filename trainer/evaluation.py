"""Evaluation as part of a job: the reward model on `stages.reward.evalData`, the policy's win rate.

    eval_set = evaluation.load_eval_data(ctx, collator, config)     # reward stage, before step 0
    final.update(evaluation.eval_data_metrics(table))               # table = metrics.reward_bench(...)
    final.update(evaluation.win_rate_after_dpo(ctx, policy, lora, collator, held_out, batch_size))

* **evalData** (reward stage): a separate set in a layout `data.uri` takes (MM-RLHF-RewardBench's), read,
  bounded (`evalMaxPairs`, whole queries: Acc+ needs every pair of a query) and checked (media, token
  lengths) when the stage starts, so a bad file fails in seconds, not after training. After training it is
  scored the way the held-out split is (reward.evaluate: generated critique, then score) and
  metrics.reward_bench gives Acc/Acc+ overall and per category. metrics.json keeps the whole table
  (`eval_data`); the status gets the overall numbers only (`eval_data_acc`, `eval_data_acc_plus`): a
  user's file may have any number of categories, and the status is a bounded object.
* **Win rate** (dpo stage, `stages.dpo.winRate`): the policy and the reference (the base model: LoRA's
  adapters disabled, else loaded again) answer up to `maxPrompts` held-out prompts (one per held-out
  query, greedy, `maxNewTokens`); the reward model (`winRate.rewardModel`, else the score stage's one,
  else this job's reward stage's) critiques and scores both answers (scoring.score_pairs, as the score
  stage does) and `win_rate` counts a win 1, a tie 1/2 (identical answers are a tie without judging).
  Skipped, with a log line and `win_rate_skipped` in metrics.json, when no reward model is available,
  under ZeRO-3 (generation from partitioned parameters would need synced_gpus), or without held-out
  queries. Ranks answer blocks of the prompts; rank 0 gets the table. Cost: 2 generations of
  maxNewTokens per prompt, 2 critiques of maxNewTokens, 1 scoring pass; peak memory: the training engine
  plus ONE more model (the reference, then the reward model: each freed before the next loads).
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from mmalign.api.stages import RewardStage
from mmalign.trainer import adapters, collate, data, media, models, preflight, scoring, storage
from mmalign.trainer.context import Context, say
from mmalign.trainer.engine import frozen, frozen_placement
from mmalign.trainer.order import chunks, rank_slice
from mmalign.trainer.template import Example

EVAL_DATA_FIELD = "stages.reward.evalData"
T = TypeVar("T")

# ------------------------------------------------------------------------------ pure functions


def whole_queries(pairs: Sequence[data.PreferencePair], max_pairs: int) -> list[data.PreferencePair]:
    """The pairs of the first queries (in file order) whose pairs together stay within `max_pairs`; at
    least the first query, whole. Acc+ is only defined on a query's full set of pairs."""
    by_query: dict[str, list[data.PreferencePair]] = {}
    for pair in pairs:
        by_query.setdefault(pair.query_id, []).append(pair)
    kept: list[data.PreferencePair] = []
    for group in by_query.values():
        if kept and len(kept) + len(group) > max_pairs:
            break
        kept += group
    return kept


def one_prompt_per_query(pairs: Sequence[data.PreferencePair], max_prompts: int) -> list[data.PreferencePair]:
    """The first pair of each query (the query's prompt and media), in order, at most `max_prompts`."""
    seen: set[str] = set()
    out: list[data.PreferencePair] = []
    for pair in pairs:
        if pair.query_id not in seen and len(out) < max_prompts:
            seen.add(pair.query_id)
            out.append(pair)
    return out


def win_rate(rows: Sequence[tuple[str, str, float, float]]) -> dict[str, Any]:
    """Rows (policy answer, reference answer, r(policy answer), r(reference answer)) -> {win_rate,
    wins, ties, losses, prompts}. Identical answers are a tie whatever their scores (the same text can
    score a hair apart in a padded batch); otherwise the higher reward wins, equal rewards tie. A tie
    counts half; win_rate is 0.5 without rows."""
    wins = ties = 0
    for policy_text, reference_text, policy_reward, reference_reward in rows:
        if policy_text == reference_text or policy_reward == reference_reward:
            ties += 1
        elif policy_reward > reference_reward:
            wins += 1
    count = len(rows)
    return {
        "win_rate": (wins + 0.5 * ties) / count if count else 0.5,
        "wins": wins,
        "ties": ties,
        "losses": count - wins - ties,
        "prompts": count,
    }


def eval_data_metrics(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A metrics.reward_bench table of evalData -> the stage's final metrics: the table whole (per
    category, metrics.json) and the overall Acc/Acc+ as floats (the status)."""
    overall = table["overall"]
    return {
        "eval_data": table,
        "eval_data_acc": float(overall["acc"]),
        "eval_data_acc_plus": float(overall["acc_plus"]),
        "eval_data_pairs": int(overall["pairs"]),
    }


# ------------------------------------------------------------------------------ reward stage: evalData


def load_eval_data(
    ctx: Context, collator: collate.Collator, config: RewardStage
) -> list[data.PreferencePair]:
    """`stages.reward.evalData` read (data.*'s reading options, media beside the file), bounded to
    `evalMaxPairs` whole queries, its media checked (rank 0; missing -> DataError unless
    data.missingMedia: placeholder) and its rows' token counts checked (data.onBadLine: error fails,
    skip leaves them out). [] without evalData and under ZeRO-3. A collective: every rank calls it."""
    if config.eval_data is None:
        return []
    spec, dist = ctx.spec, ctx.dist
    if spec.deepspeed.zero_stage == 3:  # as the held-out evaluation (docs/trainer.md, ZeRO-3 eval)
        if dist.is_rank_0:
            say(f"reward: {EVAL_DATA_FIELD} is not evaluated under deepspeed.zeroStage 3")
        return []
    source = spec.data.model_copy(update={"uri": config.eval_data, "media_uri": None, "eval_fraction": 0.0})
    try:
        pairs, _ = data.read_pairs(source)
    except (data.DataError, OSError) as error:
        raise data.DataError(f"{EVAL_DATA_FIELD}: {error}") from error
    pairs = whole_queries(pairs, config.eval_max_pairs)
    checked = _on_rank_0(ctx, lambda: preflight.survey(pairs, spec.data.video_frames))
    if checked.pairs_missing:
        where = f"{EVAL_DATA_FIELD} {config.eval_data}: media not found for {checked.pairs_missing} of {len(pairs)} pairs"
        if spec.data.missing_media == "error":
            raise data.DataError(
                f"{where}: {'; '.join(checked.problems)}. Relative paths resolve against the file's folder: put "
                "the images there, or set data.missingMedia: placeholder (scored with a grey image; the "
                "published MM-RLHF-RewardBench file ships without its images)"
            )
        if dist.is_rank_0:
            say(f"reward: {where}; they are scored with a grey placeholder image (data.missingMedia)")
    mine = [pairs[i] for i in rank_slice(len(pairs), dist.rank, dist.world_size)]
    too_long = _on_every_rank(ctx, lambda: collator.keep_fitting(mine)[1])
    if too_long:
        if spec.data.on_bad_line == "error":
            raise collate.RowTooLong(
                f"{EVAL_DATA_FIELD}: {len(too_long)} of {len(pairs)} pairs have a row longer than data.maxLength "
                f"{collator.max_length} tokens (first: {too_long[0]}); raise data.maxLength, lower data.maxPixels, "
                "or set data.onBadLine: skip to leave them out"
            )
        dropped = {text.rsplit(": ", 1)[0] for text in too_long}
        pairs = [p for p in pairs if f"row {p.id!r} ({p.uid})" not in dropped]
    if dist.is_rank_0:
        left_out = f" ({len(too_long)} longer than data.maxLength left out)" if too_long else ""
        say(
            f"reward: {EVAL_DATA_FIELD}: {len(pairs)} pairs of {len({p.query_id for p in pairs})} queries "
            f"will be scored after training{left_out}"
        )
    return pairs


def _on_rank_0(ctx: Context, work: Callable[[], T]) -> T:
    """`work()` on rank 0, its result on every rank; its exception raised on every rank (the others
    must not wait in the broadcast for a result that never comes)."""
    result: T | None = None
    failure: tuple[str, str] | None = None
    if ctx.dist.is_rank_0:
        try:
            result = work()
        except Exception as error:
            ctx.dist.broadcast_object((None, (type(error).__name__, str(error))))
            raise
    result, failure = ctx.dist.broadcast_object((result, failure))
    if failure is not None:  # as preflight.check: a data problem stays one, the rest may be retried
        name, text = failure
        kind = data.DataError if name == "DataError" else storage.StorageError
        raise kind(f"{EVAL_DATA_FIELD}: rank 0's media check: {text}")
    assert result is not None
    return result


def _on_every_rank(ctx: Context, work: Callable[[], list[str]]) -> list[str]:
    """Every rank's `work()` lists, concatenated in rank order on every rank; a rank's exception raised
    on every rank."""
    found: list[str] = []
    failure: str | None = None
    own: Exception | None = None
    try:
        found = work()
    except Exception as error:
        own, failure = error, f"{type(error).__name__}: {error}"
    gathered = ctx.dist.all_gather_object((found, failure))
    if own is not None:
        raise own
    failed = [(rank, text) for rank, (_, text) in enumerate(gathered) if text is not None]
    if failed:
        raise data.DataError(f"{EVAL_DATA_FIELD}: rank {failed[0][0]}'s token count check: {failed[0][1]}")
    return [line for part, _ in gathered for line in part]


# ------------------------------------------------------------------------------ dpo stage: win rate


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    collator: collate.Collator,
    pairs: Sequence[data.PreferencePair | Example],
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers of `model` to the pairs' prompts (with their images), one per pair."""
    batch = collator.prompts(pairs)
    tokenizer = collator.tokenizer
    out = model.generate(  # type: ignore[operator]
        **batch.model_inputs(),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=collator.end_of_turn_ids,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    new_tokens = out[:, batch.input_ids.shape[1] :]  # (B, new)
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def judge_uri(ctx: Context) -> str | None:
    """The reward model that judges: winRate.rewardModel, else the score stage's (spec.reward_model_uri),
    else None when the job has neither a reward nor a score stage."""
    spec = ctx.spec
    assert spec.stages.dpo is not None
    chosen = spec.stages.dpo.win_rate.reward_model
    if chosen is not None:
        return chosen.uri
    if spec.stages.reward is not None or spec.stages.score is not None:
        return spec.reward_model_uri()
    return None


def skip_reason(ctx: Context, held_out: Sequence[data.PreferencePair]) -> str | None:
    """Why the win rate is not measured (the same answer on every rank), or None."""
    spec = ctx.spec
    assert spec.stages.dpo is not None
    if not spec.stages.dpo.win_rate.enabled:
        return "stages.dpo.winRate.enabled is false"
    if judge_uri(ctx) is None:
        return (
            "no reward model to judge with: add stages.reward (or stages.score) to the job, or set "
            "stages.dpo.winRate.rewardModel.uri"
        )
    if spec.deepspeed.zero_stage == 3:
        return "not under deepspeed.zeroStage 3 (generation from partitioned parameters)"
    if not held_out:
        return "no held-out queries (data.evalFraction is 0 or the data has a single query)"
    return None


def win_rate_after_dpo(
    ctx: Context,
    policy: nn.Module,
    lora: adapters.Adapters | None,
    collator: collate.Collator,
    held_out: Sequence[data.PreferencePair],
    batch_size: int,
) -> dict[str, Any]:
    """{"win_rate": float, "win_rate_eval": {...}} of the trained `policy` over the reference, or
    {"win_rate_skipped": why}. `lora`: the policy's adapters (the reference is the policy with them
    disabled), else the base model is loaded again. A collective: every rank calls it."""
    spec, dist = ctx.spec, ctx.dist
    assert spec.stages.dpo is not None
    settings = spec.stages.dpo.win_rate
    why = skip_reason(ctx, held_out)
    if why is not None:
        if dist.is_rank_0:
            say(f"dpo: win rate over the reference skipped: {why}")
        return {"win_rate_skipped": why}
    started = time.monotonic()
    prompts = one_prompt_per_query(held_out, settings.max_prompts)
    mine = collator.examples([prompts[i] for i in rank_slice(len(prompts), dist.rank, dist.world_size)])
    length = settings.max_new_tokens

    training = policy.training
    policy.eval()  # no dropout while answering
    policy_answers = [
        a for part in chunks(mine, batch_size) for a in generate_answers(policy, collator, part, length)
    ]
    if lora is not None:
        with lora.disabled():  # adapters bypassed: the base model, the DPO reference
            reference_answers = [
                a
                for part in chunks(mine, batch_size)
                for a in generate_answers(policy, collator, part, length)
            ]
    else:
        base, _ = models.load_model(
            spec.model.uri, seed=spec.seed, placement=frozen_placement(spec.deepspeed, dist, shard=False)
        )
        base = frozen(base, spec.deepspeed, dist, shard=False)  # a replica: ranks answer different counts
        reference_answers = [
            a for part in chunks(mine, batch_size) for a in generate_answers(base, collator, part, length)
        ]
        del base
        _free_memory()
    policy.train(training)

    uri = judge_uri(ctx)
    assert uri is not None
    judged = [
        dataclasses.replace(example, chosen=p, rejected=r, chosen_critique="", rejected_critique="")
        for example, p, r in zip(mine, policy_answers, reference_answers, strict=True)
    ]
    rows: list[tuple[str, str, float, float]] = []
    if judged:
        judge, _ = models.load_reward_model(
            uri, seed=spec.seed, trained=True, placement=frozen_placement(spec.deepspeed, dist, shard=False)
        )
        judge = frozen(judge, spec.deepspeed, dist, shard=False)
        judge_collator = collate.Collator.from_spec(
            spec,
            models.load_processor(uri, seed=spec.seed),
            media.MediaLoader.from_spec(spec.data),
            dist.device,
            model=uri,
        )
        critique = _writes_critiques(ctx, uri)
        for part in chunks(judged, batch_size):
            scored = scoring.score_pairs(
                judge, judge_collator, part, critique=critique, max_new_tokens=length, temperature=0.0
            )
            rows += [
                (e.chosen, e.rejected, c, r)
                for e, c, r in zip(part, scored.chosen, scored.rejected, strict=True)
            ]
        del judge
        _free_memory()
    table = win_rate([row for part in dist.all_gather_object(rows) for row in part])
    table.update(reward_model=uri, max_new_tokens=length, seconds=round(time.monotonic() - started, 1))
    if dist.is_rank_0:
        say(
            f"dpo: win rate over the reference {table['win_rate']:.3f} on {table['prompts']} held-out prompts "
            f"({table['wins']} wins, {table['ties']} ties, {table['losses']} losses; judged by {uri})"
        )
    return {"win_rate": float(table["win_rate"]), "win_rate_eval": table}


def _writes_critiques(ctx: Context, uri: str) -> bool:
    """From the reward model's info file, else this job's reward stage, else True (as the score stage)."""
    written = models.reward_info_critique(uri)
    if written is not None:
        return written
    reward = ctx.spec.stages.reward
    return reward.critique if reward is not None else True


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
