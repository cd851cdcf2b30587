"""The AlignmentJob's stages: reward (critique-based reward model), score, and DPO (MM-DPO with Dynamic
Reward Scaling), with their optimisation and LoRA fields. Part of the one set of models in
mmalign/api/spec.py (see its docstring)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from mmalign.api.base import Model, rules
from mmalign.api.inputs import ModelSource
from mmalign.api.layout import StageName
from mmalign.api.runtime import StagePlacement

STAGE_ORDER: tuple[StageName, ...] = ("reward", "score", "dpo")


class _Optimization(Model):
    learning_rate: float = Field(default=1.0e-6, gt=0, description="AdamW peak learning rate.")
    epochs: int = Field(default=1, ge=1, description="Passes over the training pairs.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    micro_batch_size: int = Field(default=1, ge=1, description="Pairs per process per forward pass.")
    gradient_accumulation: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Linear warm-up share of the steps.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")


LORA_DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FREEZE_VISION_TOWER = (
    "Keep the vision encoder's weights fixed (no gradients, no optimizer state; under LoRA no adapters in "
    "it), as MM-RLHF trains (its scripts tune only the projector and the language model). The projector "
    "(LLaVA-OneVision's multi_modal_projector, Qwen2-VL's visual.merger) stays trainable unless LoRA is on. "
    "No effect on a text-only model."
)


class Lora(Model):
    r: int = Field(
        default=16, ge=1, le=4096, description="LoRA rank r of each adapter (A: r x in, B: out x r)."
    )
    alpha: float = Field(
        default=32.0, gt=0, description="LoRA alpha: an adapter's update is scaled by alpha / r."
    )
    dropout: float = Field(
        default=0.05, ge=0, lt=1, description="Dropout on an adapter's input while training."
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_DEFAULT_TARGETS),
        min_length=1,
        description="Linear layers that get adapters, by the last part of their module name (q_proj, ...), "
        "matched in the language model and the projector (and in the vision tower when freezeVisionTower "
        "is false). Everything else is frozen, so with adapters disabled the model is the base model. "
        "Default: the attention and MLP projections of Qwen2/LLaMA-style decoders.",
    )


class DpoLora(Lora):
    export: Literal["merged", "adapter"] = Field(
        default="merged",
        description="The stage's output: the base model with the adapters merged in (`merged`: a plain "
        "Hugging Face folder), or only the adapters (`adapter`: a PEFT folder, adapter_config.json + "
        "adapter_model.safetensors, to load over the base model).",
    )


class RewardStage(_Optimization, StagePlacement):
    critique: bool = Field(
        default=True,
        description="Critique-based reward model (MM-RLHF): learn to write a critique, then score "
        "(prompt, response, critique). false = plain scalar Bradley-Terry reward model.",
    )
    critique_weight: float = Field(default=1.0, ge=0, description="Weight of the critique LM loss.")
    score_weight: float = Field(default=1.0, ge=0, description="Weight of the Bradley-Terry score loss.")
    margin: float = Field(default=0.0, ge=0, description="BT margin m: -log σ(r_w - r_l - m).")
    centering_weight: float = Field(
        default=0.0, ge=0, description="Centring term c·(r_w + r_l)² that keeps rewards near zero."
    )
    eval_every_steps: int | None = Field(
        default=None, ge=1, description="Evaluate Acc/Acc+ on the held-out split every N steps."
    )
    eval_data: str | None = Field(
        default=None,
        min_length=1,
        description="A separate evaluation set, scored after training: a JSONL file (local path or s3:// "
        "URI) in a layout data.uri takes, e.g. MM-RLHF-RewardBench's (a pair's category: its `category` "
        "field, else the first folder of its media path: mcq, long, short, safety, video). Media resolve "
        "against the file's folder; data.missingMedia, onBadLine, videoFrames, maxLength and the pixel "
        "bounds apply. Acc and Acc+ overall and per category go to the stage's metrics.json "
        "(`eval_data`), the overall ones to its status metrics (eval_data_acc, eval_data_acc_plus). "
        "Skipped under deepspeed.zeroStage 3, like the held-out evaluation.",
    )
    eval_max_pairs: int = Field(
        default=1024, ge=1, le=1_000_000,
        description="At most this many pairs of evalData are scored: whole queries in file order (Acc+ "
        "needs every pair of a query), at least one query. Each pair costs two generated critiques.",
    )
    freeze_vision_tower: bool = Field(default=True, description=FREEZE_VISION_TOWER)
    lora: Lora | None = Field(
        default=None,
        description="Train LoRA adapters (and the score head, in full) instead of the whole model; the "
        "exported reward model is merged, so the score stage loads it like any other.",
    )


class ScoreStage(StagePlacement):
    reward_model: ModelSource | None = Field(
        default=None,
        description="Reward model to score with. Default: the one this job's reward stage trains.",
    )
    max_new_tokens: int = Field(default=1024, ge=1, description="Critique length limit.")
    batch_size: int = Field(
        default=16, ge=1,
        description="Pairs (2 responses each) per generation batch per process; a shard is sorted by length "
        "into such batches.",
    )
    temperature: float = Field(default=0.0, ge=0, description="0 = greedy decoding (the default).")
    shard_pairs: int = Field(
        default=256, ge=1,
        description="Pairs per output shard: the unit a restarted stage resumes from (finished shards are "
        "kept, whatever the world size). Smaller loses less work on a failure; larger makes fewer files.",
    )


# Cross-field rule messages: one text for the CEL rule (API server) and the Python check (validator).
SCORE_NEEDS_REWARD_MODEL = "stages.score needs a reward model: add stages.reward or set stages.score.rewardModel.uri"
DRS_NEEDS_MARGINS = (
    "stages.dpo.dynamicRewardScaling needs reward margins: add stages.score or set stages.dpo.scoredData"
)
BETA_DPO_WITHOUT_DRS = "dynamicRewardScaling applies to loss mm-dpo; beta-dpo scales β per batch instead"
TOKEN_BUDGET_RULES = (
    "stages.dpo.maxTokensPerBatch replaces microBatchSize (leave it out or 1) and needs prefixSharing and "
    "packing (both default true)"
)


class DynamicRewardScaling(Model):
    w: float = Field(default=0.5, ge=0, description="DRS weight w in β(δ) = β·(1 + w·(1 − e^(−kδ))).")
    k: float = Field(default=0.5, gt=0, description="DRS rate k in β(δ) = β·(1 + w·(1 − e^(−kδ))).")


class WinRate(Model):
    enabled: bool = Field(
        default=True,
        description="Run the evaluation when a reward model is available (false: never; its cost is "
        "then zero).",
    )
    max_prompts: int = Field(
        default=16, ge=1, le=100_000,
        description="Held-out prompts (one per held-out query, in the held-out order) both models answer.",
    )
    max_new_tokens: int = Field(
        default=32, ge=1, le=8192,
        description="Length limit of each generated response, and of each critique the reward model "
        "writes of it (greedy decoding).",
    )
    reward_model: ModelSource | None = Field(
        default=None,
        description="The judge: a reward-model folder the reward stage wrote. Default: the score stage's "
        "reward model (stages.score.rewardModel, else this job's reward stage); a job with neither skips "
        "the evaluation and says so.",
    )


class DpoStage(_Optimization, StagePlacement):
    model_config = ConfigDict(
        json_schema_extra=rules(
            ("!has(self.loss) || self.loss != 'beta-dpo' || !has(self.dynamicRewardScaling)",
             BETA_DPO_WITHOUT_DRS),
            ("!has(self.maxTokensPerBatch) || ((!has(self.microBatchSize) || self.microBatchSize == 1) && "
             "(!has(self.prefixSharing) || self.prefixSharing) && (!has(self.packing) || self.packing))",
             TOKEN_BUDGET_RULES),
        )
    )

    beta: float = Field(default=0.1, gt=0, description="β_ori, the DPO temperature.")
    loss: Literal["mm-dpo", "beta-dpo"] = Field(
        default="mm-dpo",
        description="mm-dpo: the paper's per-pair Dynamic Reward Scaling. beta-dpo: the batch-level "
        "β-DPO scheme of the public MM-RLHF code (reads no δ).",
    )
    dynamic_reward_scaling: DynamicRewardScaling | None = Field(
        default=None,
        description="Per-pair β from the reward margin δ of the score stage. Omit for a fixed β.",
    )
    sft_weight: float = Field(default=0.0, ge=0, description="γ: weight of the NLL(chosen) term.")
    reference: Literal["model", "precomputed"] = Field(
        default="precomputed",
        description="Reference log-probs from a frozen model during training (`model`), or computed "
        "once in a first pass and stored beside the data (`precomputed`: no reference model in "
        "memory while training).",
    )
    prefix_sharing: bool = Field(
        default=True,
        description="One prompt pass per pair: the chosen and the rejected response follow one copy of "
        "their shared prompt (image tokens included) in one sequence, with a block attention mask, for "
        "the policy, a reference model and the reference pre-pass. Same log-probs as separate rows, "
        "less compute; `false` runs each row whole (needed for attention kernels without arbitrary "
        "masks, e.g. flash-attention-2).",
    )
    packing: bool = Field(
        default=True,
        description="With prefixSharing: several pairs' sequences follow each other in one row, no padding "
        "between them (block-diagonal attention, positions restarting per pair; rows no wider than the "
        "micro-batch's longest pair), so short pairs do not pay for the longest one. Same log-probs.",
    )
    max_tokens_per_batch: int | None = Field(
        default=None, ge=1,
        description="A token budget per micro-batch instead of a pair count: each micro-batch takes pairs "
        "in the data order while its packed rows (rows x row width, padding included) stay within this "
        "many tokens; the reference pre-pass is grouped the same way. A pair longer than the budget gets "
        "a micro-batch of its own. Needs prefixSharing and packing; microBatchSize stays 1 (held-out "
        "evaluation keeps it).",
    )
    scored_data: str | None = Field(
        default=None,
        description="Scored pairs (with `delta`) to train on when this job has no score stage.",
    )
    eval_every_steps: int | None = Field(
        default=None, ge=1,
        description="Every N steps, the implicit-reward accuracy (h > 0) and mean margin h on the held-out "
        "pairs (eval_reward_accuracy, eval_margin): into the progress/status metrics, and the whole curve "
        "into metrics.json (`eval_curve`, with step 0 and the last step). One forward pass per held-out "
        "pair each time.",
    )
    freeze_vision_tower: bool = Field(default=True, description=FREEZE_VISION_TOWER)
    lora: DpoLora | None = Field(
        default=None,
        description="Train LoRA adapters instead of the whole policy. The reference is then the policy "
        "with its adapters disabled (`reference: model` keeps no second copy in memory).",
    )
    win_rate: WinRate = Field(
        default_factory=WinRate,
        description="After training: the policy and the reference (base) model answer held-out prompts "
        "(greedy), the reward model judges both answers; the win rate of the policy (ties count half) "
        "goes to metrics.json and the stage's status metrics (win_rate). Bounded by maxPrompts and "
        "maxNewTokens; skipped under deepspeed.zeroStage 3.",
    )


class Stages(Model):
    model_config = ConfigDict(
        json_schema_extra=rules(
            ("has(self.reward) || has(self.score) || has(self.dpo)", "at least one stage is required"),
        )
    )

    reward: RewardStage | None = Field(default=None, description="Train the critique-based reward model.")
    score: ScoreStage | None = Field(default=None, description="Critique and score every response.")
    dpo: DpoStage | None = Field(default=None, description="MM-DPO with Dynamic Reward Scaling.")

    def enabled(self) -> list[StageName]:
        """Stage names in pipeline order."""
        return [name for name in STAGE_ORDER if getattr(self, name) is not None]


