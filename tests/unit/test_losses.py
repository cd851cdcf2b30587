"""Each loss against an independent float64 reference (plain Python math), plus gradcheck."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mmalign.api.stages import DpoStage, RewardStage
from mmalign.trainer import losses

SHAPES = (1, 2, 7, 64)


def _log_sigmoid(x: float) -> float:
    # numerically stable log σ(x), written independently of torch
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _random(n: int, seed: int, scale: float = 3.0) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(-scale, scale) for _ in range(n)]


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ----------------------------------------------------------------------------- Bradley–Terry


@pytest.mark.parametrize("n", SHAPES)
@pytest.mark.parametrize(("margin", "centering"), [(0.0, 0.0), (0.5, 0.0), (0.0, 0.01), (1.0, 0.1)])
def test_bradley_terry_matches_reference(n: int, margin: float, centering: float) -> None:
    chosen, rejected = _random(n, 1), _random(n, 2)
    expected = sum(-_log_sigmoid(w - lo - margin) for w, lo in zip(chosen, rejected, strict=True)) / n
    expected += centering * sum((w + lo) ** 2 for w, lo in zip(chosen, rejected, strict=True)) / n
    loss, metrics = losses.bradley_terry_loss(_t(chosen), _t(rejected), margin, centering)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert metrics["rewards/accuracy"] == pytest.approx(sum(w > lo for w, lo in zip(chosen, rejected, strict=True)) / n)


def test_bradley_terry_gradcheck() -> None:
    chosen = torch.randn(5, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, lo: losses.bradley_terry_loss(w, lo, 0.3, 0.05)[0], (chosen, rejected))


def test_critique_reward_total_weights_both_terms() -> None:
    loss, metrics = losses.critique_reward_loss(_t([2.0]).sum(), _t([0.5]).sum(), critique_weight=0.25,
                                                score_weight=3.0)
    assert loss.item() == pytest.approx(0.25 * 2.0 + 3.0 * 0.5)
    assert metrics == {"loss/critique": 2.0, "loss/score": 0.5}


@pytest.mark.parametrize("critique", [True, False])
def test_bound_reward_loss_weights_the_terms_as_configured(critique: bool) -> None:
    chosen, rejected = _random(4, 3), _random(4, 4)
    critique_logps, critique_tokens = _t([-2.0, -6.0, -1.0, -3.0, -4.0, 0.0, -2.0, -5.0]), torch.tensor([2, 3, 1, 2, 2, 0, 1, 4])
    loss_fn = losses.RewardLoss(critique=critique, critique_weight=0.25, score_weight=3.0, margin=0.5,
                                centering_weight=0.1)
    loss, metrics = loss_fn(_t(chosen), _t(rejected), critique_logps, critique_tokens)
    bt = sum(-_log_sigmoid(w - lo - 0.5) for w, lo in zip(chosen, rejected, strict=True)) / 4
    bt += 0.1 * sum((w + lo) ** 2 for w, lo in zip(chosen, rejected, strict=True)) / 4
    nll = 23.0 / 15  # −Σ log p / Σ tokens over all 2B rows
    assert loss.item() == pytest.approx(0.25 * nll + 3.0 * bt if critique else 3.0 * bt, rel=1e-12)
    assert ("loss/critique" in metrics) == critique and "rewards/accuracy" in metrics
    if critique:
        with pytest.raises(ValueError, match="critique"):
            loss_fn(_t(chosen), _t(rejected))


def test_mean_token_nll_is_a_token_mean_over_the_batch() -> None:
    # rows of 1, 3 and 0 tokens (a fully padded row adds nothing)
    nll = losses.mean_token_nll(_t([-1.0, -6.0, 0.0]), torch.tensor([1, 3, 0]))
    assert nll.item() == pytest.approx(7.0 / 4)


# ----------------------------------------------------------------------------- DPO family


def _reference_dpo(pc, pr, rc, rr, betas, sft=0.0, nll=0.0) -> float:  # type: ignore[no-untyped-def]
    terms = [-_log_sigmoid(b * ((a - c) - (b_ - d))) for a, b_, c, d, b in zip(pc, pr, rc, rr, betas, strict=False)]
    return sum(terms) / len(terms) + sft * nll


def _inputs(n: int, seed: int, **extra: torch.Tensor) -> tuple[losses.DpoInputs, list[list[float]]]:
    values = [_random(n, seed + i, scale=40.0) for i in range(4)]  # summed log-probs are large
    return losses.DpoInputs(*(_t(v) for v in values), **extra), values


def _reference_beta(delta: float, beta: float, w: float, k: float) -> float:
    return beta * (1 + w * (1 - math.exp(-k * delta)))


@pytest.mark.parametrize("n", SHAPES)
def test_dpo_with_per_pair_beta_matches_reference(n: int) -> None:
    inputs, values = _inputs(n, 10)
    betas = [abs(b) / 10 for b in _random(n, 99)]
    loss, metrics = losses.dpo_loss(inputs, _t(betas))
    assert loss.item() == pytest.approx(_reference_dpo(*values, betas), rel=1e-12)
    rewards_right = [b * (a - c) > b * (r - d) for a, r, c, d, b in zip(*values, betas, strict=False)]
    assert metrics["rewards/accuracy"] == pytest.approx(sum(rewards_right) / n)


def test_dpo_at_initialisation_is_exactly_log_2() -> None:
    policy = _t(_random(16, 5, scale=80.0))
    for dtype in (torch.float64, torch.float32):
        same = policy.to(dtype)
        inputs = losses.DpoInputs(same, same - 3, same.clone(), same - 3)
        loss, _ = losses.dpo_loss(inputs, 0.1)
        assert loss.item() == math.log(2) if dtype == torch.float64 else loss.item() == pytest.approx(math.log(2), abs=1e-7)
        inputs.delta = torch.linspace(-3, 3, 16, dtype=dtype)
        assert losses.DpoLoss("mm-dpo", 0.1, w=0.5, k=0.5)(inputs)[0].item() == pytest.approx(math.log(2), abs=1e-7)
        assert losses.DpoLoss("beta-dpo", 0.1)(inputs)[0].item() == pytest.approx(math.log(2), abs=1e-7)


@pytest.mark.parametrize("delta", [-4.0, -1.0, -1e-3, 0.0, 0.5, 3.0, 50.0])
def test_dynamic_reward_scaling_is_the_paper_formula(delta: float) -> None:
    beta = losses.dynamic_reward_scaling(_t([delta]), 0.1, 0.5, 0.5).item()
    assert beta == pytest.approx(_reference_beta(delta, 0.1, 0.5, 0.5), rel=1e-12)
    if delta <= 0:
        assert beta <= 0.1  # δ ≤ 0 never raises β above β_ori
    else:
        assert 0.1 < beta < 0.1 * 1.5  # bounded by β_ori·(1 + w)
    assert losses.dynamic_reward_scaling(_t([-10.0]), 0.1, 0.5, 0.5).item() < 0  # as written: unclamped


@pytest.mark.parametrize("n", SHAPES)
def test_mm_dpo_matches_reference(n: int) -> None:
    delta = _random(n, 77, scale=4.0)  # includes δ ≤ 0
    nll = torch.tensor(2.5, dtype=torch.float64)
    inputs, values = _inputs(n, 20, delta=_t(delta), chosen_nll=nll)
    loss_fn = losses.DpoLoss("mm-dpo", beta=0.2, w=0.7, k=0.3, sft_weight=0.25)
    assert loss_fn.needs_delta and loss_fn.needs_chosen_nll and not loss_fn.needs_gathered_margins
    loss, metrics = loss_fn(inputs)
    betas = [_reference_beta(d, 0.2, 0.7, 0.3) for d in delta]
    assert loss.item() == pytest.approx(_reference_dpo(*values, betas, sft=0.25, nll=2.5), rel=1e-12)
    assert metrics["loss/sft"] == 2.5
    assert metrics["beta/mean"] == pytest.approx(sum(betas) / n, rel=1e-6)


def test_mm_dpo_without_scaling_is_plain_dpo_and_needs_delta_with_it() -> None:
    inputs, values = _inputs(8, 30)
    fixed = losses.DpoLoss("mm-dpo", beta=0.3)
    assert not fixed.needs_delta and not fixed.needs_chosen_nll
    loss, _ = fixed(inputs)
    assert loss.item() == pytest.approx(_reference_dpo(*values, [0.3] * 8), rel=1e-12)
    with pytest.raises(ValueError, match="δ"):
        losses.DpoLoss("mm-dpo", 0.1, w=0.5, k=0.5)(inputs)
    with pytest.raises(ValueError, match="chosen_nll"):
        losses.DpoLoss("mm-dpo", 0.1, sft_weight=0.1)(inputs)


def test_mm_dpo_gradcheck() -> None:
    tensors = [torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    nll = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    delta = torch.linspace(-2, 2, 6, dtype=torch.float64)

    def loss(pc, pr, rc, rr, n):  # type: ignore[no-untyped-def]
        inputs = losses.DpoInputs(pc, pr, rc, rr, chosen_nll=n, delta=delta)
        return losses.mm_dpo_loss(inputs, 0.1, 0.5, 0.5, sft_weight=0.25)[0]

    assert torch.autograd.gradcheck(loss, (*tensors, nll))


def _reference_beta_dpo_beta(margins: list[float], beta: float, w: float, chosen: list[int]) -> float:
    mean = sum(margins) / len(margins)
    return max(1e-3, beta * (1 + w * (sum(margins[i] for i in chosen) / len(chosen) - mean)))


@pytest.mark.parametrize("n", (2, 7, 64))
def test_beta_dpo_matches_the_reference_code(n: int) -> None:
    inputs, values = _inputs(n, 40)
    margins = [(a - c) - (r - d) for a, r, c, d in zip(*values, strict=False)]
    # the subset the loss draws, redrawn here with the same generator seed
    mean = sum(margins) / n
    std = math.sqrt(sum((m - mean) ** 2 for m in margins) / (n - 1))
    weights = _t([math.exp(-0.5 * ((m - mean) / (std + 1e-7)) ** 2) for m in margins])
    chosen = torch.multinomial(weights, int(n * 0.8), replacement=False,
                               generator=torch.Generator().manual_seed(3)).tolist()
    batch_beta = _reference_beta_dpo_beta(margins, 0.1, 0.1, chosen)
    loss, metrics = losses.beta_dpo_loss(inputs, 0.1, 0.1, generator=torch.Generator().manual_seed(3))
    assert loss.item() == pytest.approx(_reference_dpo(*values, [batch_beta] * n), rel=1e-10)
    assert metrics["beta/mean"] == pytest.approx(batch_beta, rel=1e-6)
    # the bound loss draws with the generator the stage puts into the inputs: the same subset, bit for bit
    inputs.generator = torch.Generator().manual_seed(3)
    bound, _ = losses.DpoLoss("beta-dpo", 0.1)(inputs)
    assert bound.item() == loss.item()


def test_beta_dpo_uses_gathered_margins_clamps_and_handles_tiny_batches() -> None:
    inputs, values = _inputs(1, 50)
    assert losses.beta_dpo_batch_beta(inputs.margins(), 0.1).item() == 0.1  # 1 margin: β_ori
    huge = _t([-1000.0, 0.0, 0.0, 0.0, 1000.0])
    assert losses.beta_dpo_batch_beta(huge, 0.1, w=10.0, generator=torch.Generator().manual_seed(0)).item() >= 1e-3
    gathered = _t([5.0, 5.0, 5.0, 5.0])  # equal margins: the subset mean equals the mean -> β_ori
    inputs.gathered_margins = gathered
    assert losses.beta_dpo_loss(inputs, 0.1)[1]["beta/mean"] == pytest.approx(0.1)


def test_dispatch_covers_every_configurable_loss() -> None:
    assert set(losses.DPO_LOSSES) == set(DpoStage.model_fields["loss"].annotation.__args__)  # type: ignore[union-attr]


def test_bound_dpo_loss_refuses_inconsistent_constants() -> None:
    with pytest.raises(ValueError, match="unknown DPO loss"):
        losses.DpoLoss("ipo", 0.1)
    with pytest.raises(ValueError, match="both w and k"):
        losses.DpoLoss("mm-dpo", 0.1, w=0.5)
    with pytest.raises(ValueError, match="no Dynamic Reward Scaling"):
        losses.DpoLoss("beta-dpo", 0.1, k=0.5)


def test_the_stages_bind_their_config_once() -> None:
    """The stage config -> loss object mapping (stages/dpo.py, stages/reward.py `bind_loss`): the one
    place that reads β, w, k, γ and the variant, and so decides whether Dynamic Reward Scaling is on."""
    from mmalign.trainer.stages import dpo, reward

    assert dpo.bind_loss(DpoStage()) == losses.DpoLoss("mm-dpo", 0.1)  # no DRS: fixed β, no δ read
    assert not dpo.bind_loss(DpoStage()).needs_delta
    drs = dpo.bind_loss(DpoStage.model_validate(
        {"beta": 0.2, "sftWeight": 0.25, "dynamicRewardScaling": {"w": 0.7, "k": 0.3}}))
    assert drs == losses.DpoLoss("mm-dpo", 0.2, w=0.7, k=0.3, sft_weight=0.25) and drs.needs_delta
    assert dpo.bind_loss(DpoStage.model_validate({"dynamicRewardScaling": {}})) == losses.DpoLoss(
        "mm-dpo", 0.1, w=0.5, k=0.5)  # the spec's DRS defaults
    beta = dpo.bind_loss(DpoStage(loss="beta-dpo", beta=0.3))
    assert beta == losses.DpoLoss("beta-dpo", 0.3, w=losses.BETA_DPO_W)
    assert beta.needs_gathered_margins and not beta.needs_delta
    config = RewardStage.model_validate({"critique": False, "critiqueWeight": 0.5, "scoreWeight": 2.0,
                                         "margin": 0.25, "centeringWeight": 0.01})
    assert reward.bind_loss(config) == losses.RewardLoss(critique=False, critique_weight=0.5, score_weight=2.0,
                                                         margin=0.25, centering_weight=0.01)


def test_beta_dpo_subset_seed_is_the_same_on_every_rank_and_differs_per_micro_batch() -> None:
    from mmalign.trainer.stages.dpo import subset_generator

    def draw(generator: torch.Generator) -> list[int]:
        return torch.multinomial(torch.ones(50), 10, replacement=False, generator=generator).tolist()

    # the seed formula resumed runs depend on: seed · 1_000_003 + step · 1009 + micro
    assert draw(subset_generator(7, 3, 1)) == draw(torch.Generator().manual_seed(7 * 1_000_003 + 3 * 1009 + 1))
    assert draw(subset_generator(7, 3, 1)) != draw(subset_generator(7, 3, 2))


def test_dynamic_reward_scaling_spreads_beta_across_pairs() -> None:
    """The metric the e2e test reads: β differs within a batch exactly when δ does."""
    import torch

    from mmalign.trainer.losses import DpoInputs, mm_dpo_loss

    zeros = torch.zeros(3, dtype=torch.float64)
    inputs = DpoInputs(zeros + 1, zeros, zeros, zeros, delta=torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64))
    _, metrics = mm_dpo_loss(inputs, beta=0.1, w=0.5, k=0.5)
    assert metrics["beta/std"] > 0.01
    _, fixed = mm_dpo_loss(inputs, beta=0.1)
    assert fixed["beta/std"] < 1e-12  # one β for all pairs (float noise only)
