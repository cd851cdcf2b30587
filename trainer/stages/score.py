"""Stage `score`: critique and score every response with the reward model; δ per pair.

    torchrun --standalone --nproc-per-node 2 -m mmalign.cli train --job JOB.yaml --stage score

Reads top to bottom: build (reward model replica on every rank; the pairs cut into fixed shards of
`shardPairs`, dealt round-robin to the ranks) → for each of this rank's shards: generate a critique of
the chosen and the rejected response and score (prompt, response, critique) (scoring.score_pairs: the
shard sorted by length into batches of `batchSize` pairs, one left-padded KV-cache decode loop per batch,
greedy unless `temperature` > 0, finished rows leave the batch, scores from the loop's last forward
where exact), upload the shard → rank 0 writes `manifest.json` LAST.

Output, `spec.artifact_uri("score")` (default `<storage>/score/scored/`):

    shard-00000-of-00003.jsonl   every input field kept + chosen_reward, rejected_reward,
    shard-00001-of-00003.jsonl   chosen_critique, rejected_critique, delta (scored-pairs format)
    shard-00002-of-00003.jsonl
    manifest.json                shards, pairs, reward model, world size, Acc/Acc+ of the reward model

The shards concatenated in name order hold the pairs in input order. Resumable at shard granularity,
whatever the world size: shards depend only on the data and `shardPairs`, so a restarted stage (another
gang, or fewer nodes) keeps every finished shard and scores only the missing ones; sampling
(`temperature` > 0) is seeded per shard, so a redone shard draws what it would have drawn. Shards are
kept only when they were written for the same identity (identity.score: the reward model's identity, the
pairs' content, the score parameters; `identity.json`, written before any shard, says which), and the
stage is done when `manifest.json` exists and records that identity. A scalar reward model (reward
stage `critique: false`) scores (prompt, response) and writes empty critiques.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import torch

from mmalign.api.layout import MANIFEST, shard_name
from mmalign.trainer import (
    collate,
    data,
    identity,
    media,
    metrics,
    models,
    preflight,
    scoring,
    storage,
    transfer,
)
from mmalign.trainer.artifacts import write_metrics
from mmalign.trainer.context import Context, say
from mmalign.trainer.engine import frozen, frozen_placement
from mmalign.trainer.progress import Progress


def shard_ranges(pairs: int, shard_pairs: int) -> list[range]:
    """The input cut into blocks of `shard_pairs` (the last one shorter): the unit of output and resume."""
    return [range(start, min(start + shard_pairs, pairs)) for start in range(0, pairs, shard_pairs)]


def reward_model_uses_critiques(ctx: Context, uri: str) -> bool:
    """From the reward model's info file (models.reward_info_critique), else the job's reward stage,
    else True."""
    written = models.reward_info_critique(uri)
    if written is not None:
        return written
    reward = ctx.spec.stages.reward
    return reward.critique if reward is not None else True


def scored_row(
    pair: data.PreferencePair, chosen: float, rejected: float, chosen_critique: str, rejected_critique: str
) -> dict[str, Any]:
    """The scored-pairs format: the input row verbatim + rewards, critiques and δ."""
    row = dict(pair.fields)
    row.setdefault("query_id", pair.query_id)
    row.setdefault("category", pair.category)
    row.update(
        chosen_reward=chosen,
        rejected_reward=rejected,
        chosen_critique=chosen_critique,
        rejected_critique=rejected_critique,
        delta=chosen - rejected,
    )
    return row


def run(ctx: Context) -> dict[str, Any]:
    spec, dist, config = ctx.spec, ctx.dist, ctx.spec.stages.score
    assert config is not None
    out_uri = spec.artifact_uri("score")
    pairs, stats = data.read_pairs(spec.data)
    checked = preflight.check(ctx, pairs, stats)  # every pair's media, before anything loads (preflight.py)
    made_by = identity.for_stage(ctx, pairs, checked.digest)  # reward model, data, media, the parameters
    manifest_uri = storage.join(out_uri, MANIFEST)
    if not identity.changed(identity.recorded(manifest_uri), made_by):  # no manifest: changed
        if dist.is_rank_0:
            say(f"score: {manifest_uri} exists for the same inputs and parameters; nothing to do")
        return {}
    identity.claim(ctx, out_uri, made_by, "scored pairs")  # shards of another identity are deleted

    # ---- build
    reward_uri = spec.reward_model_uri()
    loader = media.MediaLoader.from_spec(spec.data)
    collator = collate.Collator.from_spec(
        spec, models.load_processor(reward_uri, seed=spec.seed), loader, dist.device, model=reward_uri
    )
    pairs = preflight.fitting(ctx, pairs, collator, stats)  # data.maxLength, before the shards are cut
    shards = shard_ranges(len(pairs), config.shard_pairs)
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    mine = list(range(dist.rank, len(shards), dist.world_size))  # round-robin: ranks finish together
    finished = {item.relative for item in storage.list_prefix(out_uri)}
    critique = reward_model_uses_critiques(ctx, reward_uri)
    progress = Progress.for_stage("score", len(pairs), dist.is_rank_0)
    started = time.monotonic()
    resumed = sum(1 for name in names if name in finished)
    if dist.is_rank_0 and resumed:
        say(f"score: {resumed} of {len(shards)} shards already written by an earlier attempt; keeping them")

    # ---- score this rank's shards (those an earlier attempt finished are read back for the metrics)
    rows_metrics: list[tuple[str, str, float, float]] = []
    model: models.RewardModel | None = None  # loaded for the first shard this rank has to score
    done = fused = 0  # fused: rows scored by the generation loop's own last forward (scoring.py)
    for index in mine:
        shard_uri = storage.join(out_uri, names[index])
        shard = [pairs[i] for i in shards[index]]
        if names[index] in finished:
            for line in storage.read_text(shard_uri).splitlines():
                row = json.loads(line)
                rows_metrics.append(
                    (row["query_id"], row["category"], row["chosen_reward"], row["rejected_reward"])
                )
        else:
            if model is None:
                model, _ = models.load_reward_model(
                    reward_uri,
                    seed=spec.seed,
                    trained=True,
                    placement=frozen_placement(spec.deepspeed, dist, shard=False),
                )
                # a replica per rank, never ZeRO-3 shards: each rank scores its own shards (uneven counts)
                model = frozen(model, spec.deepspeed, dist, shard=False)
            torch.manual_seed(spec.seed + index)  # sampled critiques depend on the shard, not on the rank
            # the whole shard at once: scoring sorts it by length into batches, the rows come back in order
            scored = scoring.score_pairs(
                model,
                collator,
                shard,
                critique=critique,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                batch_size=config.batch_size,
            )
            fused += scored.fused
            with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as out:
                for i, pair in enumerate(shard):
                    out.write(
                        json.dumps(
                            scored_row(
                                pair,
                                scored.chosen[i],
                                scored.rejected[i],
                                scored.chosen_critiques[i],
                                scored.rejected_critiques[i],
                            )
                        )
                        + "\n"
                    )
                    rows_metrics.append((pair.query_id, pair.category, scored.chosen[i], scored.rejected[i]))
            transfer.upload_file(out.name, shard_uri)  # the shard appears whole or not at all
            os.unlink(out.name)
        done += len(shard)
        progress.update(min(len(pairs), done * dist.world_size))
    del model

    # ---- manifest, written last by rank 0 once every shard exists
    gathered = dist.all_gather_object(rows_metrics)
    fused_rows = sum(dist.all_gather_object(fused))
    dist.barrier()
    summary: dict[str, Any] = {}
    if dist.is_rank_0:
        for stale in storage.list_prefix(out_uri):
            if stale.relative.endswith(".jsonl") and stale.relative not in names:
                storage.delete(stale.uri)  # shards of an earlier attempt with another shardPairs
        table = metrics.reward_bench(row for rows in gathered for row in rows)
        summary = {
            "pairs": len(pairs),
            "skipped_lines": stats.skipped,
            "missing_media_pairs": checked.pairs_missing,
            "world_size": dist.world_size,
            "shard_pairs": config.shard_pairs,
            "resumed_shards": resumed,
            "reward_model": reward_uri,
            "critique": critique,
            "reward_bench": table,
            "fused_score_rows": fused_rows,  # scored in the generation pass (this attempt's shards only)
            "seconds": round(time.monotonic() - started, 1),
        }
        storage.write_json(manifest_uri, {"shards": names, **summary, "identity": made_by})
        write_metrics(ctx, summary)
        progress.update(len(pairs))
        progress.finish({"acc": table["overall"]["acc"], "acc_plus": table["overall"]["acc_plus"]})
        say(f"score: {len(pairs)} pairs scored -> {out_uri} (Acc {table['overall']['acc']:.3f})")
    dist.barrier()
    return summary
