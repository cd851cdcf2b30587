"""Stage `reward`: train the critique-based reward model (or a scalar Bradley–Terry one).

    torchrun --standalone --nproc-per-node 2 -m mmalign.cli train --job JOB.yaml --stage reward

Reads top to bottom: build (data split by query, RewardModel = VLM + score head, engine, checkpointer,
resume) → `while step < total: step; maybe save; maybe eval` → final checkpoint, eval, export.

Bound once when the stage starts: the loss (`bind_loss(config)` -> losses.RewardLoss) and the collator
(collate.Collator: processor, media loader, max length, device). Loss per micro-batch: critique RM
`L = a·NLL(annotated critiques | image, prompt, response) + b·BT(r_w, r_l)`, one forward pass over the
2B rows (chosen, rejected) with the critique teacher-forced and the score read at the last token;
`critique: false` gives `L = b·BT`.

Evaluation (Acc/Acc+ on the held-out queries, RewardBench style) scores each response the way the
score stage will (scoring.score_pairs): the model GENERATES its critique (greedy), then scores (prompt,
response, generated critique) — the annotated critiques would leak the label; a separate set,
`evalData`, is read and checked before step 0 and scored the same way after training (evaluation.py).
What is trained (adapters.py): the vision tower is frozen unless `freezeVisionTower: false`; under LoRA
the adapters and the score head (in full), the adapters merged into the exported weights. Output:
`spec.artifact_uri("reward")`, the reward-model folder of models.py (HF folder + score head + info
file), marked complete by `_complete.json` with the identity of what made it (identity.reward): a
rerun reuses it only when that identity matches.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from torch import nn

from mmalign.api.stages import RewardStage
from mmalign.trainer import (
    adapters,
    collate,
    data,
    evaluation,
    identity,
    losses,
    media,
    metrics,
    models,
    prefetch,
    preflight,
    scoring,
)
from mmalign.trainer.artifacts import (
    export_state,
    finished_before,
    remove_tree,
    upload_model_folder,
    write_metrics,
)
from mmalign.trainer.context import Context, say, seed_everything
from mmalign.trainer.engine import Engine, register_external_parameters, training_placement
from mmalign.trainer.loop import resume, resumed_batch, train_loop
from mmalign.trainer.order import chunks, plan_training, rank_slice

EVAL_MAX_NEW_TOKENS = 32  # critique length while evaluating (the score stage uses its own setting)


class RewardForward(nn.Module):
    """The reward model as DeepSpeed sees it: batch -> (scores, critique log-probs, critique tokens),
    plain tensors (ZeRO-3's backward hooks only see tensors; empty critique tensors for a scalar RM)."""

    def __init__(self, model: models.RewardModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: collate.Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(batch)
        if out.critique is None:
            empty = out.scores.new_zeros(0)
            return out.scores, empty, empty
        return out.scores, out.critique.logps, out.critique.tokens


def bind_loss(config: RewardStage) -> losses.RewardLoss:
    """The stage's loss with its constants, built once: the one place the loss fields of the config are read."""
    return losses.RewardLoss(critique=config.critique, critique_weight=config.critique_weight,
                             score_weight=config.score_weight, margin=config.margin,
                             centering_weight=config.centering_weight)


def rows_of(collator: collate.Collator, pairs: list[data.PreferencePair], critique: bool) -> collate.Batch:
    """The reward stage's rows of B pairs: 2B rows, the annotated critiques teacher-forced (`critique`)."""
    return collator.reward(pairs, critique=critique)


def micro_batch_loss(engine: Engine, collator: collate.Collator, loss_fn: losses.RewardLoss,
                     pairs: list[data.PreferencePair], batch: collate.Batch | None = None,
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """The reward-model loss of one micro-batch of B pairs (2B rows in one forward pass); `batch`: the
    pairs' rows when they were made ahead (prefetch.py, `rows_of`), else they are made here."""
    batch = rows_of(collator, pairs, loss_fn.critique) if batch is None else batch
    scores, critique_logps, critique_tokens = engine.model(batch)  # (2B,) each (critique ones empty if off)
    chosen, rejected = batch.split(scores)  # (B,) each
    return loss_fn(chosen, rejected, critique_logps, critique_tokens)


@torch.no_grad()
def evaluate(ctx: Context, model: models.RewardModel, collator: collate.Collator,
             pairs: list[data.PreferencePair], critique: bool, batch_size: int) -> dict[str, Any]:
    """RewardBench Acc/Acc+ of `model` on `pairs`; every rank scores a block, rank 0 gets the table."""
    model.eval()
    mine = [pairs[i] for i in rank_slice(len(pairs), ctx.dist.rank, ctx.dist.world_size)]
    rows = []
    for batch_pairs in chunks(mine, batch_size):
        scored = scoring.score_pairs(model, collator, batch_pairs, critique=critique,
                                     max_new_tokens=EVAL_MAX_NEW_TOKENS, temperature=0.0)
        rows += [(p.query_id, p.category, c, r)
                 for p, c, r in zip(batch_pairs, scored.chosen, scored.rejected, strict=True)]
    model.train()
    gathered = ctx.dist.all_gather_object(rows)
    return metrics.reward_bench(row for part in gathered for row in part)


def run(ctx: Context) -> dict[str, Any]:
    spec, dist, config = ctx.spec, ctx.dist, ctx.spec.stages.reward
    assert config is not None
    out_uri = spec.artifact_uri("reward")
    pairs, stats = data.read_pairs(spec.data)
    checked = preflight.check(ctx, pairs, stats)  # every pair's media, before anything loads (preflight.py)
    made_by = identity.for_stage(ctx, pairs, checked.digest)  # model, data, media, the stage's parameters
    if finished_before(ctx, out_uri, made_by):
        return {}

    # ---- build
    seed_everything(spec.seed)
    loss_fn = bind_loss(config)
    config = resumed_batch(ctx, config, made_by, "stages.reward")  # another world size: the checkpoint's batch
    processor = models.load_processor(spec.model.uri, seed=spec.seed)  # before planning: rows are counted
    collator = collate.Collator.from_spec(spec, processor, media.MediaLoader.from_spec(spec.data), dist.device)
    pairs = preflight.fitting(ctx, pairs, collator, stats, critique=config.critique)  # data.maxLength
    train, held_out, order, total = plan_training(ctx, pairs, config, "stages.reward")
    eval_set = evaluation.load_eval_data(ctx, collator, config)  # stages.reward.evalData: checked now
    model, _ = models.load_reward_model(spec.model.uri, seed=spec.seed,
                                        placement=training_placement(config, spec.deepspeed, dist))
    # the score head is not part of `model.base`: it stays trainable, in full, under LoRA too
    lora = adapters.prepare(model.base, freeze_vision_tower=config.freeze_vision_tower, lora=config.lora,
                            seed=spec.seed, field="stages.reward")
    if dist.is_rank_0:
        say(f"reward: {adapters.trainable_summary(model)}")
    wrapper = RewardForward(model)
    register_external_parameters(wrapper, spec.deepspeed)
    engine = Engine(wrapper, config, spec.deepspeed, dist, total)
    checkpointer, state, progress = resume(ctx, engine, train, total, made_by)
    eval_every = config.eval_every_steps
    can_eval = bool(held_out) and spec.deepspeed.zero_stage < 3  # see docs/trainer.md (ZeRO-3 eval)
    started = time.monotonic()
    engine.train()

    # ---- train: the micro-batches are made ahead in DataLoader workers (data.loaderWorkers, prefetch.py)
    batches = prefetch.Prefetcher.of(prefetch.training_items(order, dist.rank, int(state["step"]), total, train),
                                     collator, functools.partial(rows_of, critique=loss_fn.critique), spec.data)

    def loss_of(step: int, micro: int, indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = batches.take((step, micro, tuple(indices)))
        return micro_batch_loss(engine, collator, loss_fn, [train[i] for i in indices], batch)

    def after_step(step: int) -> None:
        if can_eval and eval_every and step % eval_every == 0 and step < total:
            table = evaluate(ctx, model, collator, held_out, config.critique, config.micro_batch_size * 2)
            progress.evaluated(step, {"eval_acc": table["overall"]["acc"],
                                      "eval_acc_plus": table["overall"]["acc_plus"]})

    with batches:
        train_loop(ctx, engine, order, total, int(state["step"]), loss_of, checkpointer, progress,
                   {"data": data.fingerprint(train)}, after_step)

    # ---- final eval and export
    final: dict[str, Any] = {"steps": total, "train_pairs": len(train), "eval_pairs": len(held_out),
                             "skipped_lines": stats.skipped, "missing_media_pairs": checked.pairs_missing,
                             "world_size": dist.world_size,
                             "seconds": round(time.monotonic() - started, 1)}
    if can_eval:
        final["reward_bench"] = evaluate(ctx, model, collator, held_out, config.critique,
                                         config.micro_batch_size * 2)
        final["eval_acc"] = final["reward_bench"]["overall"]["acc"]
        final["eval_acc_plus"] = final["reward_bench"]["overall"]["acc_plus"]
    if eval_set:  # stages.reward.evalData (evaluation.py): per category in metrics.json, overall in status
        final.update(evaluation.eval_data_metrics(
            evaluate(ctx, model, collator, eval_set, config.critique, config.micro_batch_size * 2)))
    final["final_loss"] = progress.loss
    reward_state = export_state(engine, merge=lora)  # LoRA: merged, a plain folder the score stage loads
    if dist.is_rank_0:
        folder = ctx.scratch("export")
        remove_tree(folder)
        model.save(folder, processor, state_dict=reward_state)
        models.write_reward_info(folder, critique=config.critique, base_model=spec.model.uri)
        upload_model_folder(folder, out_uri, made_by)
        remove_tree(folder)
        write_metrics(ctx, final)
        progress.finish({k: v for k, v in final.items() if isinstance(v, float)})
        say(f"reward: model -> {out_uri}")
    dist.barrier()
    return final
