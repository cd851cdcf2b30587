"""The MM-RLHF losses as pure tensor functions: log-probs or rewards in, `(loss, metrics)` out.

No model, no data, no config, no distributed calls here: the stages gather what a loss needs (e.g.
β-DPO's all-gathered margins) and pass tensors. Every function cites its equation;
tests/unit/test_losses.py checks each against an independent float64 reference and with gradcheck.

Notation (arXiv 2502.10391): r_w, r_l rewards of the chosen (winning) and rejected (losing) response;
h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), log-probs summed over the response
tokens; δ = r(y_w) − r(y_l) the reward-model margin of the score stage.

A stage binds its loss ONCE, with explicit constants, when it starts (stages/dpo.py `bind_loss`,
stages/reward.py `bind_loss` turn the stage config into these objects), then calls it per micro-batch:

    loss_fn = losses.DpoLoss("mm-dpo", beta=0.1, w=0.5, k=0.5, sft_weight=0.0)   # DRS on
    loss_fn.needs_delta, loss_fn.needs_chosen_nll, loss_fn.needs_gathered_margins  # what to put in
    loss, metrics = loss_fn(losses.DpoInputs(...))
    reward_fn = losses.RewardLoss(critique=True, critique_weight=1.0, score_weight=1.0)
    loss, metrics = reward_fn(chosen_scores, rejected_scores, critique_logps, critique_tokens)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Metrics = dict[str, float]


def _scalar(value: torch.Tensor) -> float:
    return float(value.detach().float().mean().cpu())


# ---------------------------------------------------------------------------------- reward model


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: float = 0.0,
                       centering_weight: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """Bradley–Terry reward-model loss with margin m and centring weight c, averaged over pairs:

        L_score = mean_i[ −log σ(r_w,i − r_l,i − m) ] + c · mean_i[ (r_w,i + r_l,i)² ]

    The centring term keeps rewards near zero so that δ has a stable scale for Dynamic Reward Scaling.
    `chosen_rewards`, `rejected_rewards`: (B,)."""
    difference = chosen_rewards - rejected_rewards  # (B,)
    loss = -F.logsigmoid(difference - margin).mean()
    if centering_weight:
        loss = loss + centering_weight * ((chosen_rewards + rejected_rewards) ** 2).mean()
    metrics = {
        "rewards/chosen": _scalar(chosen_rewards),
        "rewards/rejected": _scalar(rejected_rewards),
        "rewards/margin": _scalar(difference),
        "rewards/accuracy": _scalar((difference > 0).float()),
    }
    return loss, metrics


def critique_reward_loss(critique_nll: torch.Tensor, score_loss: torch.Tensor, critique_weight: float = 1.0,
                         score_weight: float = 1.0) -> tuple[torch.Tensor, Metrics]:
    """Critique-based reward model (MM-RLHF §3): L = a · L_critique + b · L_score.

    `critique_nll`: scalar mean negative log-likelihood per critique token (teacher-forced on the
    annotated critiques); `score_loss`: the Bradley–Terry loss above. a = critique_weight,
    b = score_weight (paper: 1 and 1)."""
    loss = critique_weight * critique_nll + score_weight * score_loss
    return loss, {"loss/critique": _scalar(critique_nll), "loss/score": _scalar(score_loss)}


def mean_token_nll(summed_logps: torch.Tensor, token_counts: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per token over the whole batch: −Σ_rows Σ_t log p / Σ_rows tokens.

    Token mean over the batch (not a mean of per-row means): what `nn.CrossEntropyLoss()` over the
    chosen labels gives in the MM-RLHF reference code, so long and short responses weigh per token."""
    return -summed_logps.sum() / token_counts.sum().clamp(min=1)


# ---------------------------------------------------------------------------------- DPO family


@dataclasses.dataclass
class DpoInputs:
    """Per-pair tensors of one micro-batch, (B,) each unless noted."""

    policy_chosen: torch.Tensor  # Σ log π(y_w | x)
    policy_rejected: torch.Tensor  # Σ log π(y_l | x)
    reference_chosen: torch.Tensor  # Σ log π_ref(y_w | x)
    reference_rejected: torch.Tensor  # Σ log π_ref(y_l | x)
    chosen_nll: torch.Tensor | None = None  # scalar mean_token_nll of the chosen responses (SFT term)
    delta: torch.Tensor | None = None  # reward margins δ from the score stage (mm-dpo)
    gathered_margins: torch.Tensor | None = None  # h of the GLOBAL batch, all ranks (beta-dpo)
    generator: torch.Generator | None = None  # beta-dpo's subset draw: seeded the same on every rank

    def margins(self) -> torch.Tensor:
        """h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), (B,)."""
        return (self.policy_chosen - self.reference_chosen) - (self.policy_rejected - self.reference_rejected)


def dynamic_reward_scaling(delta: torch.Tensor, beta: float, w: float, k: float) -> torch.Tensor:
    """The paper's Dynamic Reward Scaling (MM-RLHF eq. for MM-DPO), exactly as written:

        β(δ) = β_ori · (1 + w · (1 − e^(−k·δ)))

    δ > 0 raises β up to β_ori·(1 + w); δ = 0 gives β_ori; δ < 0 gives β < β_ori, and for
    δ < −ln(1 + 1/w)/k β is NEGATIVE (the pair then pushes the policy towards y_l). We keep the formula
    unclamped on purpose (a reward model trained with the BT loss rarely scores its chosen responses
    that far below the rejected ones); `beta/negative_fraction` in the metrics shows when it happens."""
    return beta * (1 + w * (1 - torch.exp(-k * delta)))


def dpo_loss(inputs: DpoInputs, beta: float | torch.Tensor, sft_weight: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """DPO with a per-pair (or scalar) β and an optional SFT term (Rafailov et al. 2023, eq. 7):

        L = mean_i[ −log σ(β_i · h_i) ] + γ · NLL(y_w)

    γ = sft_weight; NLL(y_w) = `inputs.chosen_nll` (mean per chosen response token, see
    mean_token_nll). Implicit rewards for the metrics: β_i · (log π − log π_ref) per response."""
    margins = inputs.margins()  # (B,)
    beta_t = torch.as_tensor(beta, dtype=margins.dtype, device=margins.device).expand_as(margins)
    dpo = -F.logsigmoid(beta_t * margins).mean()
    loss = dpo
    metrics: Metrics = {"loss/dpo": _scalar(dpo)}
    if sft_weight:
        if inputs.chosen_nll is None:
            raise ValueError("sft_weight > 0 needs inputs.chosen_nll (mean NLL of the chosen tokens)")
        loss = loss + sft_weight * inputs.chosen_nll
        metrics["loss/sft"] = _scalar(inputs.chosen_nll)
    chosen_rewards = (beta_t * (inputs.policy_chosen - inputs.reference_chosen)).detach()
    rejected_rewards = (beta_t * (inputs.policy_rejected - inputs.reference_rejected)).detach()
    metrics.update({
        "rewards/chosen": _scalar(chosen_rewards),
        "rewards/rejected": _scalar(rejected_rewards),
        "rewards/margin": _scalar(chosen_rewards - rejected_rewards),
        "rewards/accuracy": _scalar((chosen_rewards > rejected_rewards).float()),
        "beta/mean": _scalar(beta_t),
        # > 0 exactly when pairs of one batch got different β (Dynamic Reward Scaling at work)
        "beta/std": _scalar(beta_t.std(unbiased=False)),
        "beta/negative_fraction": _scalar((beta_t < 0).float()),
        "logps/chosen": _scalar(inputs.policy_chosen),
        "logps/rejected": _scalar(inputs.policy_rejected),
    })
    return loss, metrics


def mm_dpo_loss(inputs: DpoInputs, beta: float, w: float | None = None, k: float | None = None,
                sft_weight: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """MM-DPO (MM-RLHF §4): DPO with Dynamic Reward Scaling plus the SFT term:

        L = mean_i[ −log σ(β(δ_i) · h_i) ] + γ · NLL(y_w),   β(δ) = β_ori·(1 + w·(1 − e^(−k·δ)))

    With w or k None (no `dynamicRewardScaling` in the spec) or no δ, β = β_ori for every pair."""
    if w is None or k is None:
        return dpo_loss(inputs, beta, sft_weight)
    if inputs.delta is None:
        raise ValueError("Dynamic Reward Scaling needs the score stage's δ per pair (inputs.delta)")
    per_pair = dynamic_reward_scaling(inputs.delta.to(inputs.policy_chosen.dtype), beta, w, k)
    return dpo_loss(inputs, per_pair, sft_weight)


BETA_DPO_KEEP = 0.8  # fraction of the batch sampled to estimate the shift (reference code: 1 - 0.2)
BETA_DPO_W = 0.1  # `ls_factor_weight` in the reference script scripts/train/dpo_ov7b.sh


def beta_dpo_batch_beta(margins: torch.Tensor, beta: float, w: float = BETA_DPO_W,
                        keep: float = BETA_DPO_KEEP, generator: torch.Generator | None = None) -> torch.Tensor:
    """The batch-level β of the public MM-RLHF code (github.com/Kwai-YuanQi/MM-RLHF,
    trl/trainer/dpo_trainer.py, `dpo_loss` with `implicit_beta=True`), after β-DPO (Wu et al. 2024):

        A = all-gathered h of the global batch (detached);  μ, σ = mean(A), std(A) (unbiased)
        p_j ∝ exp(−½ ((A_j − μ) / (σ + 1e−7))²);  S = ⌊0.8·|A|⌋ indices drawn from p without replacement
        β_batch = max(1e−3, β_ori · (1 + w · (mean_{j∈S} A_j − μ)))

    One β for the whole batch; the reward margins δ are never read. With fewer than 2 margins β_ori.
    `generator` makes the draw reproducible (the reference uses the global RNG); pass the same seed on
    every rank so all ranks use the same β."""
    values = margins.detach().double().cpu()
    count = int(values.numel() * keep)
    if values.numel() < 2 or count < 1:
        return torch.tensor(beta, dtype=margins.dtype, device=margins.device)
    mean, std = values.mean(), values.std()
    weights = torch.exp(-0.5 * ((values - mean) / (std + 1e-7)) ** 2)
    chosen = torch.multinomial(weights, count, replacement=False, generator=generator)
    batch_beta = beta * (1 + w * (values[chosen].mean() - mean))
    return batch_beta.clamp(min=1e-3).to(dtype=margins.dtype, device=margins.device)


def beta_dpo_loss(inputs: DpoInputs, beta: float, w: float = BETA_DPO_W, sft_weight: float = 0.0,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, Metrics]:
    """`beta-dpo`: L = mean_i[ −log σ(β_batch · h_i) ] + γ · NLL(y_w), β_batch from
    beta_dpo_batch_beta over `inputs.gathered_margins` (this rank's margins when not given). As in the
    reference code every pair keeps its loss: the sampled subset only sets β_batch."""
    source = inputs.gathered_margins if inputs.gathered_margins is not None else inputs.margins()
    batch_beta = beta_dpo_batch_beta(source, beta, w, generator=generator)
    return dpo_loss(inputs, batch_beta, sft_weight)


# ---------------------------------------------------------------------------------- bound losses


@dataclasses.dataclass(frozen=True)
class RewardLoss:
    """The reward-model loss with its constants bound: critique RM `a·NLL(critique) + b·BT` (critique
    on) or the scalar RM `b·BT` (critique off); BT = bradley_terry_loss(margin m, centring c)."""

    critique: bool = True
    critique_weight: float = 1.0  # a
    score_weight: float = 1.0  # b
    margin: float = 0.0  # m
    centering_weight: float = 0.0  # c

    def __call__(self, chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                 critique_logps: torch.Tensor | None = None,
                 critique_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
        """`chosen_scores`, `rejected_scores`: (B,); `critique_logps`, `critique_tokens`: (2B,) summed
        critique-token log-probs and critique-token counts of every row (needed when `critique`)."""
        score_loss, metrics = bradley_terry_loss(chosen_scores, rejected_scores, self.margin,
                                                 self.centering_weight)
        if not self.critique:
            return self.score_weight * score_loss, metrics
        if critique_logps is None or critique_tokens is None:
            raise ValueError("a critique reward model needs the critique log-probs and token counts")
        nll = mean_token_nll(critique_logps, critique_tokens)
        loss, parts = critique_reward_loss(nll, score_loss, self.critique_weight, self.score_weight)
        metrics.update(parts)
        return loss, metrics


@dataclasses.dataclass(frozen=True)
class DpoLoss:
    """One loss of the DPO family with its constants bound; `loss_fn(inputs) -> (loss, metrics)`.

    variant "mm-dpo": mm_dpo_loss with β_ori = `beta`, Dynamic Reward Scaling weight `w` and rate `k`
    (both None: a fixed β, no δ read); "beta-dpo": beta_dpo_loss with β_ori = `beta` and the batch-β
    weight `w` (None: BETA_DPO_W), `k` unused. γ = `sft_weight` for both. The `needs_*` properties say
    which optional DpoInputs fields the caller must fill: the one place that decides, e.g., whether
    Dynamic Reward Scaling is on (and hence whether the pairs must carry δ)."""

    variant: str
    beta: float
    w: float | None = None
    k: float | None = None
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.variant not in DPO_LOSSES:
            raise ValueError(f"unknown DPO loss {self.variant!r}; known: {', '.join(sorted(DPO_LOSSES))}")
        if self.variant == "mm-dpo" and (self.w is None) != (self.k is None):
            raise ValueError("mm-dpo: Dynamic Reward Scaling needs both w and k (or neither, for a fixed β)")
        if self.variant == "beta-dpo":
            if self.k is not None:
                raise ValueError("beta-dpo has no Dynamic Reward Scaling rate k (it reads no δ)")
            if self.w is None:
                object.__setattr__(self, "w", BETA_DPO_W)

    @property
    def needs_delta(self) -> bool:
        """Dynamic Reward Scaling is on: `inputs.delta` (the score stage's δ per pair) is read."""
        return self.variant == "mm-dpo" and self.k is not None

    @property
    def needs_chosen_nll(self) -> bool:
        """The SFT term is on: `inputs.chosen_nll` is read."""
        return self.sft_weight > 0

    @property
    def needs_gathered_margins(self) -> bool:
        """β-DPO: `inputs.gathered_margins` (h of the global batch) and `inputs.generator` are read."""
        return self.variant == "beta-dpo"

    def __call__(self, inputs: DpoInputs) -> tuple[torch.Tensor, Metrics]:
        return DPO_LOSSES[self.variant](self, inputs)


def _mm_dpo(loss: DpoLoss, inputs: DpoInputs) -> tuple[torch.Tensor, Metrics]:
    return mm_dpo_loss(inputs, loss.beta, loss.w, loss.k, loss.sft_weight)


def _beta_dpo(loss: DpoLoss, inputs: DpoInputs) -> tuple[torch.Tensor, Metrics]:
    assert loss.w is not None  # __post_init__ fills BETA_DPO_W
    return beta_dpo_loss(inputs, loss.beta, loss.w, loss.sft_weight, inputs.generator)


# DpoLoss.variant -> the function of (bound loss, inputs); the keys are DpoStage.loss's values.
DPO_LOSSES: dict[str, Callable[[DpoLoss, DpoInputs], tuple[torch.Tensor, Metrics]]] = {
    "mm-dpo": _mm_dpo,
    "beta-dpo": _beta_dpo,
}

LOG_2 = math.log(2.0)  # the DPO loss at initialisation (policy == reference: h = 0)
