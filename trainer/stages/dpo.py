"""Stage `dpo`: MM-DPO over all pairs with Dynamic Reward Scaling (or β-DPO, or a fixed β).

    torchrun --standalone --nproc-per-node 2 -m mmalign.cli train --job JOB.yaml --stage dpo

Reads top to bottom: build (pairs from `spec.dpo_data_uri()`: the score stage's scored pairs with δ,
given scored data, or the raw data; split by query; policy engine; the reference) → `while step <
total: step; maybe save; maybe eval (evalEverySteps: held-out implicit-reward accuracy, metrics.json
`eval_curve`)` → final checkpoint, held-out implicit-reward accuracy, the win rate over the
reference judged by the reward model (evaluation.py, `winRate`), export.

Reference (`stages.dpo.reference`):
* `model`: a frozen copy of the base model stays in memory and scores every micro-batch; under LoRA
  (`stages.dpo.lora`) the reference is the policy itself with its adapters disabled (no second copy);
* `precomputed` (default): a first pass computes log π_ref(y_w), log π_ref(y_l) of every pair (each rank
  a block), stores them in `<storage>/dpo/reference-logps/` (JSONL shards + manifest.json written last,
  keyed by pair uid, tagged with identity.reference_logps: the pairs' content, the base model's identity
  and the token budget, so a restart reuses them and any change recomputes them), and the
  reference model is freed before training starts.

Bound once when the stage starts: the loss (`bind_loss(config)` -> losses.DpoLoss, whose `needs_*`
say whether the pairs must carry δ, whether the SFT term and β-DPO's gathered margins are computed)
and the collator (collate.Collator: processor, media loader, max length, device). Loss per
micro-batch: mm-dpo: −log σ(β(δ)·h) with β(δ) = β·(1 + w(1 − e^(−kδ))) (fixed β without
`dynamicRewardScaling`), + γ·NLL(y_w) when `sftWeight` > 0; beta-dpo: one β per global micro-batch from
the all-gathered margins. What is trained (adapters.py): the vision tower is frozen unless
`freezeVisionTower: false`; under LoRA only the adapters. Output: the policy as an HF folder at
`spec.artifact_uri("dpo")` (LoRA: merged, or only the adapters with `lora.export: adapter`), marked
complete by `_complete.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from mmalign.api import layout
from mmalign.api.inputs import DataSource
from mmalign.api.stages import DpoStage
from mmalign.trainer import (
    adapters,
    collate,
    data,
    evaluation,
    identity,
    logprobs,
    losses,
    media,
    models,
    prefetch,
    prefix,
    preflight,
    storage,
    transfer,
)
from mmalign.trainer.artifacts import (
    export_state,
    finished_before,
    remove_tree,
    upload_model_folder,
    write_metrics,
)
from mmalign.trainer.context import Context, StageConfigError, say, seed_everything
from mmalign.trainer.engine import (
    Distributed,
    Engine,
    frozen,
    frozen_placement,
    register_external_parameters,
    training_placement,
)
from mmalign.trainer.loop import resume, resumed_batch, train_loop
from mmalign.trainer.order import TokenBudgetOrder, budget_groups, plan_training, rank_slice

ReferenceTable = dict[str, tuple[float, float]]  # pair uid -> (log π_ref(y_w), log π_ref(y_l))


class SequenceLogps(nn.Module):
    """The model as DeepSpeed sees it: batch -> (logps, tokens), per-row summed response log-probs and
    token counts (logprobs.py). Plain tensors out: ZeRO-3's backward hooks only see tensors.
    `prefix_sharing` (stages.dpo.prefixSharing): one prompt pass per pair (prefix.py); `packing`
    (stages.dpo.packing): several pairs per row, no padding between them; `handoff` (tower_handoff):
    shared by the policy's and the reference's wrappers, the reference runs only its projector over the
    policy's frozen vision-tower output of the same batch."""

    def __init__(self, model: nn.Module, prefix_sharing: bool = True, packing: bool = False,
                 handoff: logprobs.TowerHandoff | None = None) -> None:
        super().__init__()
        self.model = model
        self.prefix_sharing = prefix_sharing
        self.packing = packing and prefix_sharing
        self.handoff = handoff

    def forward(self, batch: collate.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        out = logprobs.policy_logprobs(self.model, batch, prefix_sharing=self.prefix_sharing,
                                       packing=self.packing, handoff=self.handoff)
        return out.logps, out.tokens


def tower_handoff(policy: nn.Module, reference: nn.Module) -> tuple[logprobs.TowerHandoff | None, str]:
    """A TowerHandoff for the policy and a `reference: model` pass (the same module under LoRA), or
    None, and why. Reusing the policy's tower output is exact only if the reference's tower computes
    the same function all along: a Qwen2-VL / Qwen2.5-VL tower (the merger stays each model's own), frozen
    in the policy with no adapter or trainable weight inside (so it never changes), and weight for
    weight equal to the reference's (the same base checkpoint). ZeRO-3 partitions the weights, so
    they cannot be compared here: no handoff there."""
    config: Any = getattr(policy, "config", None)
    if getattr(config, "model_type", None) not in ("qwen2_vl", "qwen2_5_vl"):
        return None, "not a Qwen2-VL / Qwen2.5-VL model"
    frozen_names, kept = adapters.vision_tower(policy, "stages.dpo")
    def tower(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [(f"{name}.{key}", p) for name in frozen_names for key, p in model.get_submodule(name).named_parameters()
                if not any(f"{name}.{key}".startswith(f"{k}.") for k in kept)]
    mine, theirs = tower(policy), dict(tower(reference))
    if any(p.requires_grad for _, p in mine):
        return None, "the policy trains its vision tower (freezeVisionTower: false, or adapters in it)"
    if any(hasattr(p, "ds_id") for _, p in mine):
        return None, "ZeRO-3 partitions the towers' weights"
    if reference is not policy and (set(theirs) != {n for n, _ in mine} or not all(
            torch.equal(p, theirs[n]) for n, p in mine)):
        return None, "the reference's vision tower differs from the policy's"
    return logprobs.TowerHandoff(), "the reference reuses the policy's frozen vision-tower output"


def bind_loss(config: DpoStage) -> losses.DpoLoss:
    """The stage's loss with its constants, built once: the one place the loss fields of the config are
    read (beta-dpo has no `dynamicRewardScaling`, the config refuses it; its w is losses.BETA_DPO_W)."""
    scaling = config.dynamic_reward_scaling
    return losses.DpoLoss(config.loss, beta=config.beta, w=scaling.w if scaling else None,
                          k=scaling.k if scaling else None, sft_weight=config.sft_weight)


def subset_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """β-DPO's subset draw: the same on every rank, different per step and micro-batch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + micro)


def load_pairs(ctx: Context, needs_delta: bool) -> tuple[list[data.PreferencePair], data.ReadStats]:
    """The pairs to train on and what reading them skipped; `needs_delta` (the loss's Dynamic Reward Scaling is on): every pair must
    carry its reward margin δ, else a DataError that says how to get scored pairs."""
    spec = ctx.spec
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
    pairs, stats = data.read_pairs(source)
    if needs_delta:
        missing = [p.uid for p in pairs if p.delta is None]
        if missing:
            raise data.DataError(
                f"{uri}: {len(missing)} pairs have no reward margin `delta` (first: {missing[0]}); Dynamic "
                "Reward Scaling needs scored pairs: run the score stage or point stages.dpo.scoredData at "
                "a scored-pairs file")
    return pairs, stats


def _builtin_media(uri: str) -> str:
    """Scored copies of a builtin dataset keep its relative image paths: resolve them in its folder."""
    from mmalign.trainer import builtin

    return os.path.dirname(builtin.dataset_file(uri))


# ------------------------------------------------------------------------------ reference


@dataclasses.dataclass
class Reference:
    """log π_ref(y_w), log π_ref(y_l) of a batch's pairs: looked up in the precomputed `table`
    (`reference: precomputed`), or a forward pass of the frozen reference `model` (`reference: model`).
    Under LoRA `model` is the policy's engine and `lora` its adapters, disabled for this pass (and
    eval mode: no dropout), which makes it the base model."""

    table: ReferenceTable | None = None
    model: nn.Module | None = None
    lora: adapters.Adapters | None = None

    def logps(self, pairs: list[data.PreferencePair], batch: collate.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,), (B,) float32 on the batch's device."""
        if self.table is not None:
            values = torch.tensor([self.table[p.uid] for p in pairs], dtype=torch.float32)  # (B, 2)
            return values[:, 0].to(batch.input_ids.device), values[:, 1].to(batch.input_ids.device)
        assert self.model is not None
        training = self.model.training
        base = self.lora.disabled() if self.lora is not None else nullcontext()
        try:
            with torch.no_grad(), base:
                self.model.eval()
                return batch.split(self.model(batch)[0].float())  # (2B,) -> chosen, rejected
        finally:
            self.model.train(training)


def precompute_reference(ctx: Context, pairs: list[data.PreferencePair], loader: media.MediaLoader,
                         batch_size: int, made_by: identity.Identity,
                         tokens: dict[str, int] | None = None) -> ReferenceTable:
    """Reference log-probs of every pair, computed once and stored; reused when they match. The pass
    loads its own copy of the base model (and processor, hence its own collator) and frees it after.
    `tokens` (stages.dpo.maxTokensPerBatch: pair uid -> packed tokens): forwards cut by the token
    budget as the training micro-batches are, instead of `batch_size` pairs."""
    spec, dist = ctx.spec, ctx.dist
    uri = ctx.stage_uri(layout.REFERENCE_LOGPS)
    fingerprint = identity.reference_logps(made_by)
    manifest_uri = storage.join(uri, layout.MANIFEST)
    manifest = storage.read_json(manifest_uri) if storage.exists(manifest_uri) else None
    if manifest is None or manifest.get("fingerprint") != fingerprint:
        shard = storage.join(uri, layout.shard_name(dist.rank, dist.world_size))
        if manifest is not None and dist.is_rank_0:
            diff = identity.changed(manifest.get("fingerprint"), fingerprint)
            identity.not_reused(ctx, f"reference log-probs at {uri} were computed for other inputs "
                                f"(changed: {', '.join(diff)}); recomputing them")
            storage.delete_prefix(uri)  # written for other data or another model
        dist.barrier()
        mine = [pairs[i] for i in rank_slice(len(pairs), dist.rank, dist.world_size)]
        model, processor = models.load_model(spec.model.uri, seed=spec.seed,
                                             placement=frozen_placement(spec.deepspeed, dist, shard=False))
        # a replica, not ZeRO-3 shards: the ranks' blocks (and so their forward counts) differ
        dpo = spec.stages.dpo
        prefix_sharing, packing = dpo is None or dpo.prefix_sharing, dpo is None or dpo.packing
        reference = frozen(SequenceLogps(model, prefix_sharing, packing), spec.deepspeed, dist, shard=False)
        collator = collate.Collator.from_spec(spec, processor, loader, dist.device)
        blocks = prefetch.blocks(mine, batch_size)
        if tokens is not None and dpo is not None and dpo.max_tokens_per_batch:
            groups = budget_groups([tokens[p.uid] for p in mine], dpo.max_tokens_per_batch)
            blocks = [prefetch.Work(index, [mine[i] for i in group]) for index, group in enumerate(groups)]
        batches = prefetch.Prefetcher.of(blocks, collator, collate.Collator.pairs,
                                         spec.data)  # made ahead in DataLoader workers
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as out, batches:
            for work, batch in batches:
                part = work.pairs
                with torch.no_grad():
                    chosen, rejected = batch.split(reference(batch)[0].float().cpu())  # (B,), (B,)
                for pair, c, r in zip(part, chosen.tolist(), rejected.tolist(), strict=True):
                    out.write(json.dumps({"uid": pair.uid, "chosen": c, "rejected": r}) + "\n")
        transfer.upload_file(out.name, shard)
        os.unlink(out.name)
        del reference, model
        _free_memory()
        dist.barrier()
        if dist.is_rank_0:
            shards = [layout.shard_name(r, dist.world_size) for r in range(dist.world_size)]
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


def _pair_tokens(collator: collate.Collator, pairs: list[data.PreferencePair]) -> list[int]:
    return prefix.share(collator.pairs(pairs)).pair_lengths


def packed_tokens(ctx: Context, collator: collate.Collator, pairs: list[data.PreferencePair]) -> dict[str, int]:
    """pair uid -> the tokens of its prefix-shared sequence (chosen + rejected - shared prompt): what
    stages.dpo.maxTokensPerBatch counts. One collating pass over the pairs (media loaded, in
    data.loaderWorkers workers), before step 0."""
    made = prefetch.Prefetcher(prefetch.blocks(pairs, 16), functools.partial(_pair_tokens, collator.on_cpu()),
                               workers=ctx.spec.data.loader_workers, prefetch=ctx.spec.data.prefetch_batches)
    tokens: dict[str, int] = {}
    with made:
        for work, lengths in made:
            tokens.update((pair.uid, length) for pair, length in zip(work.pairs, lengths, strict=True))
    return tokens


def budget_steps(order: TokenBudgetOrder, config: DpoStage) -> int:
    """Optimizer steps of a token-budget schedule, or a clear error when one step does not fill."""
    if order.steps_per_epoch < 1:
        raise StageConfigError(
            f"stages.dpo: one optimizer step needs {order.global_batch} micro-batches of maxTokensPerBatch "
            f"{order.budget} tokens (gradientAccumulation x world size) but the {order.pairs} training pairs make "
            "fewer; lower maxTokensPerBatch or gradientAccumulation, or add data")
    return order.total_steps(config.epochs, config.max_steps)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ loss and eval


def micro_batch_loss(engine: Engine, collator: collate.Collator, reference: Reference, loss_fn: losses.DpoLoss,
                     pairs: list[data.PreferencePair], dist: Distributed,
                     generator: torch.Generator | None = None, batch: collate.Batch | None = None,
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO loss of one micro-batch of B pairs (2B rows in one policy forward). The optional loss
    inputs are computed exactly when `loss_fn` reads them; `generator`: β-DPO's subset draw; `batch`:
    the pairs' batch when it was made ahead (prefetch.py), else it is made here."""
    batch = collator.pairs(pairs) if batch is None else batch
    policy_logps, policy_tokens = engine.model(batch)  # (2B,) each
    policy_chosen, policy_rejected = batch.split(policy_logps)  # (B,) each
    reference_chosen, reference_rejected = reference.logps(pairs, batch)
    inputs = losses.DpoInputs(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                              reference_chosen=reference_chosen, reference_rejected=reference_rejected)
    if loss_fn.needs_chosen_nll:
        inputs.chosen_nll = losses.mean_token_nll(policy_chosen, batch.split(policy_tokens)[0])
    if loss_fn.needs_delta:
        inputs.delta = torch.tensor([p.delta for p in pairs], dtype=torch.float32, device=dist.device)
    if loss_fn.needs_gathered_margins:
        inputs.gathered_margins = dist.all_gather(inputs.margins().detach())  # (world · B,)
        inputs.generator = generator
    return loss_fn(inputs)


@torch.no_grad()
def evaluate(ctx: Context, engine: Engine, collator: collate.Collator, reference: Reference,
             pairs: list[data.PreferencePair], batch_size: int) -> dict[str, float]:
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
        batch = collator.pairs(part)
        policy_chosen, policy_rejected = batch.split(engine.model(batch)[0].float())  # (B,) each
        reference_chosen, reference_rejected = reference.logps(part, batch)
        margins = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)  # (B,)
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
    loss_fn = bind_loss(config)
    pairs, stats = load_pairs(ctx, loss_fn.needs_delta)
    checked = preflight.check(ctx, pairs, stats)  # every pair's media, before anything loads (preflight.py)
    made_by = identity.for_stage(ctx, pairs, checked.digest)  # pairs, media, base model, the parameters
    if finished_before(ctx, out_uri, made_by):
        return {}

    # ---- build
    seed_everything(spec.seed)
    config = resumed_batch(ctx, config, made_by, "stages.dpo")  # another world size: the checkpoint's batch
    loader = media.MediaLoader.from_spec(spec.data)
    processor = models.load_processor(spec.model.uri, seed=spec.seed)  # before planning: rows are counted
    collator = collate.Collator.from_spec(spec, processor, loader, dist.device)
    pairs = preflight.fitting(ctx, pairs, collator, stats)  # data.maxLength
    train, held_out, order, total = plan_training(ctx, pairs, config, "stages.dpo")
    tokens = None
    if config.max_tokens_per_batch:  # micro-batches cut by tokens, not pairs: every pair's length first
        tokens = packed_tokens(ctx, collator, pairs)
        order = TokenBudgetOrder(len(train), 1, config.gradient_accumulation, dist.world_size, spec.seed,
                                 lengths=tuple(tokens[p.uid] for p in train), budget=config.max_tokens_per_batch)
        total = budget_steps(order, config)
    started = time.monotonic()
    reference = Reference()  # reference: model under LoRA: the policy's engine, set below
    wrapped: SequenceLogps | None = None  # the reference model's wrapper (reference: model, no LoRA)
    if config.reference == "precomputed":
        reference = Reference(table=precompute_reference(ctx, pairs, loader, config.micro_batch_size, made_by,
                                                               tokens))
    elif config.lora is None:
        reference_model, _ = models.load_model(spec.model.uri, seed=spec.seed,
                                               placement=frozen_placement(spec.deepspeed, dist, shard=True))
        wrapped = SequenceLogps(reference_model, config.prefix_sharing, config.packing)
        register_external_parameters(wrapped, spec.deepspeed)
        # ZeRO-3-sharded like the policy: every rank runs the same forward passes (train loop, evaluate)
        reference = Reference(model=frozen(wrapped, spec.deepspeed, dist, shard=True))
    policy, _ = models.load_model(spec.model.uri, seed=spec.seed,
                                  placement=training_placement(config, spec.deepspeed, dist))
    lora = adapters.prepare(policy, freeze_vision_tower=config.freeze_vision_tower, lora=config.lora,
                            seed=spec.seed, field="stages.dpo")
    if dist.is_rank_0:
        say(f"dpo: {adapters.trainable_summary(policy)}")
    wrapper = SequenceLogps(policy, config.prefix_sharing, config.packing)
    register_external_parameters(wrapper, spec.deepspeed)
    engine = Engine(wrapper, config, spec.deepspeed, dist, total)
    if config.reference == "model" and getattr(policy.config, "vision_config", None) is not None:
        # one tower forward per batch, not two; checked after the engine cast the policy's precision
        handoff, why = tower_handoff(policy, wrapped.model if wrapped is not None else policy)
        wrapper.handoff = handoff
        if wrapped is not None:
            wrapped.handoff = handoff
        if dist.is_rank_0:
            say(f"dpo: reference vision tower: {why}")
    if reference.table is None and reference.model is None:
        reference = Reference(model=engine.model, lora=lora)  # the base model = adapters disabled
    checkpointer, state, progress = resume(ctx, engine, train, total, made_by)
    initial = state.get("initial_eval")
    if initial is None:
        initial = evaluate(ctx, engine, collator, reference, held_out, config.micro_batch_size)
    engine.train()
    eval_every = config.eval_every_steps
    # stages.dpo.evalEverySteps: [{step, eval_reward_accuracy, eval_margin}], step 0 first; in the
    # checkpoints' client state, so a resumed stage keeps the points before its checkpoint
    curve: list[dict[str, float]] = [dict(p) for p in state.get("eval_curve") or [] if p["step"] <= state["step"]]
    if eval_every and held_out and not curve and initial:
        curve.append({"step": 0, **initial})

    # ---- train: the micro-batches are made ahead in DataLoader workers (data.loaderWorkers, prefetch.py)
    batches = prefetch.Prefetcher.of(prefetch.training_items(order, dist.rank, int(state["step"]), total, train),
                                     collator, collate.Collator.pairs, spec.data)

    def loss_of(step: int, micro: int, indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        generator = subset_generator(spec.seed, step, micro) if loss_fn.needs_gathered_margins else None
        batch = batches.take((step, micro, tuple(indices)))
        return micro_batch_loss(engine, collator, reference, loss_fn, [train[i] for i in indices], dist, generator,
                                batch)

    def after_step(step: int) -> None:
        if eval_every and held_out and step % eval_every == 0 and step < total:
            point = evaluate(ctx, engine, collator, reference, held_out, config.micro_batch_size)
            curve.append({"step": step, **point})
            progress.evaluated(step, point)

    with batches:
        train_loop(ctx, engine, order, total, int(state["step"]), loss_of, checkpointer, progress,
                   {"data": data.fingerprint(train), "initial_eval": initial, "eval_curve": curve}, after_step)

    # ---- final eval and export
    final: dict[str, Any] = {"steps": total, "train_pairs": len(train), "eval_pairs": len(held_out),
                             "skipped_lines": stats.skipped, "missing_media_pairs": checked.pairs_missing,
                             "world_size": dist.world_size, "loss": config.loss,
                             "reference": config.reference, "seconds": round(time.monotonic() - started, 1)}
    final.update(evaluate(ctx, engine, collator, reference, held_out, config.micro_batch_size))
    final.update({f"{k}_initial": v for k, v in (initial or {}).items()})
    if curve:
        final["eval_curve"] = [*curve, {"step": total, "eval_reward_accuracy": final["eval_reward_accuracy"],
                                        "eval_margin": final["eval_margin"]}]
    final["final_loss"] = progress.loss
    # the policy and the reference answer held-out prompts, the reward model judges (stages.dpo.winRate)
    final.update(evaluation.win_rate_after_dpo(ctx, policy, lora, collator, held_out, config.micro_batch_size * 2))
    adapter_only = lora is not None and config.lora is not None and config.lora.export == "adapter"
    policy_state = export_state(engine, merge=None if adapter_only else lora)
    if dist.is_rank_0:
        folder = ctx.scratch("export")
        remove_tree(folder)
        if adapter_only and lora is not None:
            adapters.save_adapter(lora, folder, policy_state, processor, base_model=spec.model.uri)
        else:
            models.save_model(policy, processor, folder, state_dict=policy_state)  # the module the engine trains
        upload_model_folder(folder, out_uri, made_by)
        remove_tree(folder)
        write_metrics(ctx, final)
        progress.finish({k: v for k, v in final.items() if isinstance(v, float) and math.isfinite(v)})
        say(f"dpo: policy -> {out_uri}")
    dist.barrier()
    return final
