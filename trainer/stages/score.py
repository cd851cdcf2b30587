"""Stage `score`: critique and score every response with the reward model; δ per pair.

    torchrun --standalone --nproc-per-node 2 -m mmalign.cli train --job JOB.yaml --stage score

Reads top to bottom: build (reward model replica on every rank; the pairs cut into fixed shards of
`shardPairs`, dealt round-robin to the ranks) → for each of this rank's shards: generate a critique of
the chosen and the rejected response (batched, left-padded, KV cache, greedy unless `temperature` > 0),
score (prompt, response, critique), upload the shard → rank 0 writes `manifest.json` LAST.

Output, `spec.artifact_uri("score")` (default `<storage>/score/scored/`):

    shard-00000-of-00003.jsonl   every input field kept + chosen_reward, rejected_reward,
    shard-00001-of-00003.jsonl   chosen_critique, rejected_critique, delta (scored-pairs format)
    shard-00002-of-00003.jsonl
    manifest.json                shards, pairs, reward model, world size, Acc/Acc+ of the reward model

The shards concatenated in name order hold the pairs in input order. Resumable at shard granularity,
whatever the world size: shards depend only on the data and `shardPairs`, so a restarted stage (another
gang, or fewer nodes) keeps every finished shard and scores only the missing ones; sampling
(`temperature` > 0) is seeded per shard, so a redone shard draws what it would have drawn. When
`manifest.json` exists the stage is done. A scalar reward model (reward stage `critique: false`) scores
(prompt, response) and writes empty critiques.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import torch

from mmalign.trainer import collate, data, media, metrics, models, storage, transfer
from mmalign.trainer.progress import Progress
from mmalign.trainer.stages.common import Context, chunks, say, write_metrics

MANIFEST = "manifest.json"
REWARD_INFO = "mmalign_reward.json"  # written beside a reward model by the reward stage


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.jsonl"


def shard_ranges(pairs: int, shard_pairs: int) -> list[range]:
    """The input cut into blocks of `shard_pairs` (the last one shorter): the unit of output and resume."""
    return [range(start, min(start + shard_pairs, pairs)) for start in range(0, pairs, shard_pairs)]


def reward_model_uses_critiques(ctx: Context, uri: str) -> bool:
    """From the reward model folder's mmalign_reward.json, else the job's reward stage, else True."""
    try:
        return bool(storage.read_json(storage.join(uri, REWARD_INFO))["critique"])
    except (FileNotFoundError, KeyError, ValueError):
        reward = ctx.spec.stages.reward
        return reward.critique if reward is not None else True


@torch.no_grad()
def score_examples(model: models.RewardModel, processor: Any, examples: list[collate.Example], *,
                   critique: bool, max_new_tokens: int, temperature: float, max_length: int,
                   device: torch.device) -> tuple[list[float], list[float], list[str], list[str]]:
    """(chosen rewards, rejected rewards, chosen critiques, rejected critiques) for B pairs."""
    count = len(examples)
    chosen_critiques = rejected_critiques = [""] * count
    if critique:
        prompts = collate.collate_generation(examples, processor, max_length).to(device)
        texts = model.generate_critiques(prompts, processor, max_new_tokens=max_new_tokens,
                                         temperature=temperature)  # 2B: chosen rows, then rejected
        chosen_critiques, rejected_critiques = texts[:count], texts[count:]
        batch = collate.collate_reward(examples, processor, critique=True, max_length=max_length,
                                       critiques=list(zip(chosen_critiques, rejected_critiques, strict=True)))
    else:
        batch = collate.collate_reward(examples, processor, critique=False, max_length=max_length)
    scores = model(batch.to(device)).scores.float().cpu().tolist()  # (2B,)
    return scores[:count], scores[count:], list(chosen_critiques), list(rejected_critiques)


def scored_row(pair: data.PreferencePair, chosen: float, rejected: float, chosen_critique: str,
               rejected_critique: str) -> dict[str, Any]:
    """The scored-pairs format: the input row verbatim + rewards, critiques and δ."""
    row = dict(pair.fields)
    row.setdefault("query_id", pair.query_id)
    row.setdefault("category", pair.category)
    row.update(chosen_reward=chosen, rejected_reward=rejected, chosen_critique=chosen_critique,
               rejected_critique=rejected_critique, delta=chosen - rejected)
    return row


def run(ctx: Context) -> dict[str, Any]:
    spec, dist, config = ctx.spec, ctx.dist, ctx.spec.stages.score
    assert config is not None
    out_uri = spec.artifact_uri("score")
    if storage.exists(storage.join(out_uri, MANIFEST)):
        if dist.is_rank_0:
            say(f"score: {out_uri}{MANIFEST} exists; the stage is complete, nothing to do")
        return {}

    # ---- build
    pairs, stats = data.read_pairs(spec.data)
    shards = shard_ranges(len(pairs), config.shard_pairs)
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    mine = list(range(dist.rank, len(shards), dist.world_size))  # round-robin: ranks finish together
    finished = {item.relative for item in storage.list_prefix(out_uri)}
    reward_uri = spec.reward_model_uri()
    critique = reward_model_uses_critiques(ctx, reward_uri)
    progress = Progress("score", len(pairs), dist.is_rank_0,
                        interval=float(os.environ.get("MMALIGN_PROGRESS_INTERVAL", "10")))
    started = time.monotonic()
    resumed = sum(1 for name in names if name in finished)
    if dist.is_rank_0 and resumed:
        say(f"score: {resumed} of {len(shards)} shards already written by an earlier attempt; keeping them")

    # ---- score this rank's shards (those an earlier attempt finished are read back for the metrics)
    rows_metrics: list[tuple[str, str, float, float]] = []
    loader = media.MediaLoader.from_spec(spec.data)
    model = processor = None  # loaded for the first shard this rank has to score
    done = 0
    for index in mine:
        shard_uri = storage.join(out_uri, names[index])
        shard = [pairs[i] for i in shards[index]]
        if names[index] in finished:
            for line in storage.read_text(shard_uri).splitlines():
                row = json.loads(line)
                rows_metrics.append((row["query_id"], row["category"], row["chosen_reward"],
                                     row["rejected_reward"]))
        else:
            if model is None:
                model, processor = models.load_reward_model(reward_uri, seed=spec.seed)
                if spec.deepspeed.bf16 and dist.device.type == "cuda":
                    model = model.to(torch.bfloat16)
                model.to(dist.device).eval()
            torch.manual_seed(spec.seed + index)  # sampled critiques depend on the shard, not on the rank
            with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as out:
                for batch_pairs in chunks(shard, config.batch_size):
                    examples = [collate.Example.from_pair(p, loader.load(p)) for p in batch_pairs]
                    chosen, rejected, chosen_critiques, rejected_critiques = score_examples(
                        model, processor, examples, critique=critique, max_new_tokens=config.max_new_tokens,
                        temperature=config.temperature, max_length=spec.data.max_length, device=dist.device)
                    for i, pair in enumerate(batch_pairs):
                        out.write(json.dumps(scored_row(pair, chosen[i], rejected[i], chosen_critiques[i],
                                                        rejected_critiques[i])) + "\n")
                        rows_metrics.append((pair.query_id, pair.category, chosen[i], rejected[i]))
            transfer.upload_file(out.name, shard_uri)  # the shard appears whole or not at all
            os.unlink(out.name)
        done += len(shard)
        progress.update(min(len(pairs), done * dist.world_size))
    del model

    # ---- manifest, written last by rank 0 once every shard exists
    gathered = dist.all_gather_object(rows_metrics)
    dist.barrier()
    summary: dict[str, Any] = {}
    if dist.is_rank_0:
        for stale in storage.list_prefix(out_uri):
            if stale.relative.endswith(".jsonl") and stale.relative not in names:
                storage.delete(stale.uri)  # shards of an earlier attempt with another shardPairs
        table = metrics.reward_bench(row for rows in gathered for row in rows)
        summary = {
            "pairs": len(pairs), "skipped_lines": stats.skipped, "world_size": dist.world_size,
            "shard_pairs": config.shard_pairs, "resumed_shards": resumed,
            "reward_model": reward_uri, "critique": critique, "reward_bench": table,
            "seconds": round(time.monotonic() - started, 1),
        }
        storage.write_json(storage.join(out_uri, MANIFEST), {"shards": names, **summary})
        write_metrics(ctx, summary)
        progress.update(len(pairs))
        progress.finish({"acc": table["overall"]["acc"], "acc_plus": table["overall"]["acc_plus"]})
        say(f"score: {len(pairs)} pairs scored -> {out_uri} (Acc {table['overall']['acc']:.3f})")
    dist.barrier()
    return summary
