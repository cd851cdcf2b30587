"""Stage `dpo`: MM-DPO over all pairs with Dynamic Reward Scaling (or β-DPO, or a fixed β).

    torchrun --standalone --nproc-per-node 2 -m mmalign.cli train --job JOB.yaml --stage dpo

Reads top to bottom: build (pairs from `spec.dpo_data_uri()`: the score stage's scored pairs with δ,
given scored data, or the raw data; split by query; policy engine; the reference) → `while step <
total: step; maybe save` → final checkpoint, held-out implicit-reward accuracy, export.

Reference (`stages.dpo.reference`):
* `model`: a frozen copy of the base model stays in memory and scores every micro-batch;
* `precomputed` (default): a first pass computes log π_ref(y_w), log π_ref(y_l) of every pair (each rank
  a block), stores them in `<storage>/dpo/reference-logps/` (JSONL shards + manifest.json written last,
  keyed by pair uid, tagged with the data fingerprint and model URI so a restart reuses them), and the
  reference model is freed before training starts.

Loss per micro-batch: losses.DPO_LOSSES[loss] — mm-dpo: −log σ(β(δ)·h) with β(δ) = β·(1 + w(1 − e^(−kδ)))
(fixed β without `dynamicRewardScaling`), + γ·NLL(y_w) when `sftWeight` > 0; beta-dpo: one β per
global micro-batch from the all-gathered margins. Output: the policy as an HF folder at
`spec.artifact_uri("dpo")`, marked complete by `_complete.json`.
"""

from __future__ import annotations

import gc
import json
import math
import os
import tempfile
import time
from typing import Any

import torch
from torch import nn

from mmalign.api.spec import DataSource
from mmalign.trainer import collate, data, logprobs, losses, media, models, storage, transfer
from mmalign.trainer.engine import Engine, frozen, register_external_parameters
from mmalign.trainer.stages.common import (
    Context,
    export_state,
    finished_before,
    plan_training,
    rank_slice,
    remove_tree,
    resume,
    say,
    seed_everything,
    train_loop,
    upload_model_folder,
    write_metrics,
)

ReferenceTable = dict[str, tuple[float, float]]  # pair uid -> (log π_ref(y_w), log π_ref(y_l))


class SequenceLogps(nn.Module):
    """The model as DeepSpeed sees it: batch -> (logps, tokens), per-row summed response log-probs and
    token counts (logprobs.py). Plain tensors out: ZeRO-3's backward hooks only see tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: collate.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        out = logprobs.policy_logprobs(self.model, batch)
        return out.logps, out.tokens


def load_pairs(ctx: Context) -> list[data.PreferencePair]:
    spec, config = ctx.spec, ctx.spec.stages.dpo
    assert config is not None
    uri = spec.dpo_data_uri()
    if uri == spec.data.uri:
        source = spec.data
    else:
        # Scored pairs keep the rows' relative media paths: resolve them where the raw data's resolve
        # (our score stage's output), or next to the user's scoredData file unless mediaUri says where.
        if spec.data.media_uri:
            media_uri: str | None = spec.data.media_uri
        elif uri != spec.artifact_uri("score"):
            media_uri = None
        elif spec.data.uri.startswith("builtin://"):
            media_uri = _builtin_media(spec.data.uri)
        else:
            media_uri = data.media_base_of(spec.data.uri)
        source = DataSource(uri=uri, media_uri=media_uri, on_bad_line=spec.data.on_bad_line,
                            missing_media=spec.data.missing_media, video_frames=spec.data.video_frames,
                            max_length=spec.data.max_length)
    pairs, _ = data.read_pairs(source)
    if config.dynamic_reward_scaling is not None:
        missing = [p.uid for p in pairs if p.delta is None]
        if missing:
            raise data.DataError(
                f"{uri}: {len(missing)} pairs have no reward margin `delta` (first: {missing[0]}); Dynamic "
                "Reward Scaling needs scored pairs: run the score stage or point stages.dpo.scoredData at "
                "a scored-pairs file")
    return pairs


def _builtin_media(uri: str) -> str:
    """Scored copies of a builtin dataset keep its relative image paths: resolve them in its folder."""
    from mmalign.trainer import builtin

    return os.path.dirname(builtin.dataset_file(uri))


# ------------------------------------------------------------------------------ reference


@torch.no_grad()
def _batch_logps(model: nn.Module, processor: Any, pairs: list[data.PreferencePair], loader: media.MediaLoader,
                 max_length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    examples = [collate.Example.from_pair(p, loader.load(p)) for p in pairs]
    batch = collate.collate_pairs(examples, processor, max_length).to(device)
    logps = model(batch)[0].float().cpu()  # (2B,)
    return logps[:len(pairs)], logps[len(pairs):]


def precompute_reference(ctx: Context, pairs: list[data.PreferencePair], loader: media.MediaLoader,
                         batch_size: int) -> ReferenceTable:
    """Reference log-probs of every pair, computed once and stored; reused when they match."""
    spec, dist = ctx.spec, ctx.dist
    uri = ctx.stage_uri("reference-logps/")
    fingerprint = {"data": data.fingerprint(pairs), "model": spec.model.uri, "seed": spec.seed,
                   "max_length": spec.data.max_length}
    manifest_uri = storage.join(uri, "manifest.json")
    manifest = storage.read_json(manifest_uri) if storage.exists(manifest_uri) else None
    if manifest is None or manifest.get("fingerprint") != fingerprint:
        shard = storage.join(uri, f"shard-{dist.rank:05d}-of-{dist.world_size:05d}.jsonl")
        if manifest is not None and dist.is_rank_0:
            storage.delete_prefix(uri)  # written for other data or another model
        dist.barrier()
        mine = [pairs[i] for i in rank_slice(len(pairs), dist.rank, dist.world_size)]
        model, processor = models.load_model(spec.model.uri, seed=spec.seed)
        reference = SequenceLogps(model)
        reference = frozen(reference, spec.deepspeed, _no_shard(dist))  # replica: ranks' counts differ
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as out:
            for start in range(0, len(mine), batch_size):
                part = mine[start:start + batch_size]
                chosen, rejected = _batch_logps(reference, processor, part, loader, spec.data.max_length,
                                                dist.device)
                for pair, c, r in zip(part, chosen.tolist(), rejected.tolist(), strict=True):
                    out.write(json.dumps({"uid": pair.uid, "chosen": c, "rejected": r}) + "\n")
        transfer.upload_file(out.name, shard)
        os.unlink(out.name)
        del reference, model
        _free_memory()
        dist.barrier()
        if dist.is_rank_0:
            shards = [f"shard-{r:05d}-of-{dist.world_size:05d}.jsonl" for r in range(dist.world_size)]
            storage.write_json(manifest_uri, {"fingerprint": fingerprint, "shards": shards, "pairs": len(pairs)})
        dist.barrier()
        manifest = storage.read_json(manifest_uri)
    table: ReferenceTable = {}
    for name in manifest["shards"]:
        for line in storage.read_text(storage.join(uri, name)).splitlines():
            row = json.loads(line)
            table[row["uid"]] = (float(row["chosen"]), float(row["rejected"]))
    missing = [p.uid for p in pairs if p.uid not in table]
    if missing:
        raise storage.StorageError(f"{uri}: reference log-probs missing for {len(missing)} pairs "
                                   f"(first {missing[0]}); delete the folder to recompute")
    return table


def _no_shard(dist: Any) -> Any:
    """A world-of-one view: the precompute pass runs uneven per-rank batch counts, so no ZeRO-3 sharding."""
    import dataclasses

    return dataclasses.replace(dist, world_size=1)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ loss and eval


def _reference_for(pairs: list[data.PreferencePair], table: ReferenceTable | None, reference: nn.Module | None,
                   batch: collate.Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if table is not None:
        values = torch.tensor([table[p.uid] for p in pairs], dtype=torch.float32)  # (B, 2)
        return values[:, 0].to(batch.input_ids.device), values[:, 1].to(batch.input_ids.device)
    assert reference is not None
    with torch.no_grad():
        logps = reference(batch)[0].float()
    return logps[:len(pairs)], logps[len(pairs):]


def micro_batch_loss(ctx: Context, engine: Engine, processor: Any, pairs: list[data.PreferencePair],
                     loader: media.MediaLoader, table: ReferenceTable | None, reference: nn.Module | None,
                     generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    config, dist = ctx.spec.stages.dpo, ctx.dist
    assert config is not None
    examples = [collate.Example.from_pair(p, loader.load(p)) for p in pairs]
    batch = collate.collate_pairs(examples, processor, ctx.spec.data.max_length).to(dist.device)
    policy_logps, policy_tokens = engine.model(batch)  # (2B,) each
    count = len(pairs)
    reference_chosen, reference_rejected = _reference_for(pairs, table, reference, batch)
    inputs = losses.DpoInputs(
        policy_chosen=policy_logps[:count], policy_rejected=policy_logps[count:],
        reference_chosen=reference_chosen, reference_rejected=reference_rejected,
        chosen_nll=losses.mean_token_nll(policy_logps[:count], policy_tokens[:count])
        if config.sft_weight else None,
        delta=torch.tensor([p.delta for p in pairs], dtype=torch.float32, device=dist.device)
        if config.dynamic_reward_scaling is not None else None,
    )
    if config.loss == "beta-dpo":
        inputs.gathered_margins = dist.all_gather(inputs.margins().detach())
    return losses.DPO_LOSSES[config.loss](inputs, config, generator=generator)


@torch.no_grad()
def evaluate(ctx: Context, engine: Engine, processor: Any, pairs: list[data.PreferencePair],
             loader: media.MediaLoader, table: ReferenceTable | None, reference: nn.Module | None,
             batch_size: int) -> dict[str, float]:
    """Implicit-reward accuracy (h > 0) and mean margin h on `pairs`, over all ranks. Every rank runs
    the same number of forward passes (ZeRO-3 needs it), padding with a repeated pair when short."""
    dist = ctx.dist
    if not pairs:
        return {}
    engine.eval()
    global_batch = batch_size * dist.world_size
    right = margin_sum = count = 0.0
    for start in range(0, len(pairs), global_batch):
        window = pairs[start:start + global_batch]
        mine = [window[i] for i in rank_slice(len(window), dist.rank, dist.world_size)]
        part = mine or window[:1]  # keep the forward count equal on every rank
        examples = [collate.Example.from_pair(p, loader.load(p)) for p in part]
        batch = collate.collate_pairs(examples, processor, ctx.spec.data.max_length).to(dist.device)
        policy = engine.model(batch)[0].float()
        reference_chosen, reference_rejected = _reference_for(part, table, reference, batch)
        margins = (policy[:len(part)] - reference_chosen) - (policy[len(part):] - reference_rejected)
        if mine:
            right += float((margins > 0).sum())
            margin_sum += float(margins.sum())
            count += len(mine)
    engine.train()
    right, margin_sum, count = dist.all_reduce_sum([right, margin_sum, count])
    return {"eval_reward_accuracy": right / count, "eval_margin": margin_sum / count}


# ------------------------------------------------------------------------------ the stage


def run(ctx: Context) -> dict[str, Any]:
    spec, dist, config = ctx.spec, ctx.dist, ctx.spec.stages.dpo
    assert config is not None
    out_uri = spec.artifact_uri("dpo")
    if finished_before(ctx, out_uri):
        return {}

    # ---- build
    seed_everything(spec.seed)
    pairs = load_pairs(ctx)
    train, held_out, order, total = plan_training(ctx, pairs, config, "stages.dpo")
    loader = media.MediaLoader.from_spec(spec.data)
    started = time.monotonic()
    table: ReferenceTable | None = None
    reference: nn.Module | None = None
    if config.reference == "precomputed":
        table = precompute_reference(ctx, pairs, loader, config.micro_batch_size)
    else:
        reference_model, _ = models.load_model(spec.model.uri, seed=spec.seed)
        wrapped = SequenceLogps(reference_model)
        register_external_parameters(wrapped, spec.deepspeed)
        reference = frozen(wrapped, spec.deepspeed, dist)
    policy, processor = models.load_model(spec.model.uri, seed=spec.seed)
    wrapper = SequenceLogps(policy)
    register_external_parameters(wrapper, spec.deepspeed)
    engine = Engine(wrapper, config, spec.deepspeed, dist, total)
    checkpointer, state, progress = resume(ctx, engine, train, total)
    initial = state.get("initial_eval")
    if initial is None:
        initial = evaluate(ctx, engine, processor, held_out, loader, table, reference, config.micro_batch_size)
    engine.train()

    # ---- train
    def loss_of(step: int, micro: int, indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        # beta-dpo's subset draw: the same on every rank, different per step and micro-batch
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + step * 1009 + micro)
        return micro_batch_loss(ctx, engine, processor, [train[i] for i in indices], loader, table, reference,
                                generator)

    train_loop(ctx, engine, order, total, int(state["step"]), loss_of, checkpointer, progress,
               {"data": data.fingerprint(train), "initial_eval": initial})

    # ---- final eval and export
    final: dict[str, Any] = {"steps": total, "train_pairs": len(train), "eval_pairs": len(held_out),
                             "world_size": dist.world_size, "loss": config.loss,
                             "reference": config.reference, "seconds": round(time.monotonic() - started, 1)}
    final.update(evaluate(ctx, engine, processor, held_out, loader, table, reference, config.micro_batch_size))
    final.update({f"{k}_initial": v for k, v in (initial or {}).items()})
    final["final_loss"] = progress.loss
    policy_state = export_state(engine)
    if dist.is_rank_0:
        folder = ctx.scratch("export")
        remove_tree(folder)
        models.save_model(engine.module.model, processor, folder, state_dict=policy_state)
        upload_model_folder(folder, out_uri)
        remove_tree(folder)
        write_metrics(ctx, final)
        progress.finish({k: v for k, v in final.items() if isinstance(v, float) and math.isfinite(v)})
        say(f"dpo: policy -> {out_uri}")
    dist.barrier()
    return final
