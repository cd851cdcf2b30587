"""Stage `reward`: train the critique-based reward model (or a scalar Bradley–Terry one).

    torchrun --standalone --nproc-per-node 2 -m mmalign.cli train --job JOB.yaml --stage reward

Reads top to bottom: build (data split by query, RewardModel = VLM + score head, engine, checkpointer,
resume) → `while step < total: step; maybe save; maybe eval` → final checkpoint, eval, export.

Loss per micro-batch (losses.py): critique RM `L = a·NLL(annotated critiques | image, prompt, response)
+ b·BT(r_w, r_l)`, one forward pass over the 2B rows (chosen, rejected) with the critique teacher-forced
and the score read at the last token; `critique: false` gives `L = b·BT`.

Evaluation (Acc/Acc+ on the held-out queries, RewardBench style) scores each response the way the
score stage will: the model GENERATES its critique (greedy), then scores (prompt, response, generated
critique) — the annotated critiques would leak the label. Output: `spec.artifact_uri("reward")`, an HF
folder + `score_head.safetensors` + `mmalign_reward.json`, marked complete by `_complete.json`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from mmalign.trainer import collate, data, losses, media, metrics, models, storage
from mmalign.trainer.engine import Engine, register_external_parameters
from mmalign.trainer.stages.common import (
    Context,
    chunks,
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
from mmalign.trainer.stages.score import REWARD_INFO, score_examples

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


def micro_batch_loss(engine: Engine, processor: Any, examples: list[collate.Example], config: Any,
                     max_length: int, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """The reward-model loss of one micro-batch of B pairs (2B rows in one forward pass)."""
    batch = collate.collate_reward(examples, processor, critique=config.critique, max_length=max_length)
    scores, critique_logps, critique_tokens = engine.model(batch.to(device))  # (2B,) each
    count = len(examples)
    score_loss, step_metrics = losses.bradley_terry_loss(scores[:count], scores[count:],
                                                         config.margin, config.centering_weight)
    if config.critique:
        nll = losses.mean_token_nll(critique_logps, critique_tokens)
        loss, parts = losses.critique_reward_loss(nll, score_loss, config.critique_weight, config.score_weight)
        step_metrics.update(parts)
    else:
        loss = config.score_weight * score_loss
    return loss, step_metrics


@torch.no_grad()
def evaluate(ctx: Context, model: models.RewardModel, processor: Any, pairs: list[data.PreferencePair],
             loader: media.MediaLoader, critique: bool, batch_size: int) -> dict[str, Any]:
    """RewardBench Acc/Acc+ of `model` on `pairs`; every rank scores a block, rank 0 gets the table."""
    model.eval()
    mine = [pairs[i] for i in rank_slice(len(pairs), ctx.dist.rank, ctx.dist.world_size)]
    rows = []
    for batch_pairs in chunks(mine, batch_size):
        examples = [collate.Example.from_pair(p, loader.load(p)) for p in batch_pairs]
        chosen, rejected, _, _ = score_examples(
            model, processor, examples, critique=critique, max_new_tokens=EVAL_MAX_NEW_TOKENS,
            temperature=0.0, max_length=ctx.spec.data.max_length, device=ctx.dist.device)
        rows += [(p.query_id, p.category, c, r) for p, c, r in zip(batch_pairs, chosen, rejected, strict=True)]
    model.train()
    gathered = ctx.dist.all_gather_object(rows)
    return metrics.reward_bench(row for part in gathered for row in part)


def run(ctx: Context) -> dict[str, Any]:
    spec, dist, config = ctx.spec, ctx.dist, ctx.spec.stages.reward
    assert config is not None
    out_uri = spec.artifact_uri("reward")
    if finished_before(ctx, out_uri):
        return {}

    # ---- build
    seed_everything(spec.seed)
    pairs, stats = data.read_pairs(spec.data)
    train, held_out, order, total = plan_training(ctx, pairs, config, "stages.reward")
    model, processor = models.load_reward_model(spec.model.uri, seed=spec.seed)
    wrapper = RewardForward(model)
    register_external_parameters(wrapper, spec.deepspeed)
    engine = Engine(wrapper, config, spec.deepspeed, dist, total)
    checkpointer, state, progress = resume(ctx, engine, train, total)
    loader = media.MediaLoader.from_spec(spec.data)
    eval_every = config.eval_every_steps
    can_eval = bool(held_out) and spec.deepspeed.zero_stage < 3  # see docs/trainer.md (ZeRO-3 eval)
    started = time.monotonic()
    engine.train()

    # ---- train
    def loss_of(step: int, micro: int, indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        examples = [collate.Example.from_pair(train[i], loader.load(train[i])) for i in indices]
        return micro_batch_loss(engine, processor, examples, config, spec.data.max_length, dist.device)

    def after_step(step: int) -> None:
        if can_eval and eval_every and step % eval_every == 0 and step < total:
            table = evaluate(ctx, model, processor, held_out, loader, config.critique,
                             config.micro_batch_size * 2)
            progress.evaluated(step, {"eval_acc": table["overall"]["acc"],
                                      "eval_acc_plus": table["overall"]["acc_plus"]})

    train_loop(ctx, engine, order, total, int(state["step"]), loss_of, checkpointer, progress,
               {"data": data.fingerprint(train)}, after_step)

    # ---- final eval and export
    final: dict[str, Any] = {"steps": total, "train_pairs": len(train), "eval_pairs": len(held_out),
                             "skipped_lines": stats.skipped, "world_size": dist.world_size,
                             "seconds": round(time.monotonic() - started, 1)}
    if can_eval:
        final["reward_bench"] = evaluate(ctx, model, processor, held_out, loader, config.critique,
                                         config.micro_batch_size * 2)
        final["eval_acc"] = final["reward_bench"]["overall"]["acc"]
        final["eval_acc_plus"] = final["reward_bench"]["overall"]["acc_plus"]
    final["final_loss"] = progress.loss
    reward_state = export_state(engine)
    if dist.is_rank_0:
        folder = ctx.scratch("export")
        remove_tree(folder)
        model.save(folder, processor, state_dict=reward_state)
        storage.write_json(str(folder / REWARD_INFO), {"critique": config.critique,
                                                         "base_model": spec.model.uri})
        upload_model_folder(folder, out_uri)
        remove_tree(folder)
        write_metrics(ctx, final)
        progress.finish({k: v for k, v in final.items() if isinstance(v, float)})
        say(f"reward: model -> {out_uri}")
    dist.barrier()
    return final
