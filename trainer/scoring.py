"""Critique, then score: how a reward model judges (chosen, rejected) pairs, the same way wherever it runs.

    scored = scoring.score_pairs(model, collator, pairs, critique=True, max_new_tokens=1024, temperature=0.0)
    scored.chosen, scored.rejected                      # rewards r(y_w), r(y_l) per pair
    scored.chosen_critiques, scored.rejected_critiques  # generated critiques ("" for a scalar model)

Used by the reward stage's held-out evaluation and by the score stage (its δ = r(y_w) − r(y_l)), so
Acc/Acc+ measured while training is measured the way the scores DPO trains on are made. A critique
reward model GENERATES its critique of each response (the annotated critiques would leak the label),
then scores (prompt, response, generated critique); a scalar one scores (prompt, response).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from mmalign.trainer.collate import Collator
from mmalign.trainer.data import PreferencePair
from mmalign.trainer.models import RewardModel
from mmalign.trainer.template import Example


@dataclasses.dataclass
class Scores:
    """Per pair, in input order: rewards and the critiques they were scored with."""

    chosen: list[float]
    rejected: list[float]
    chosen_critiques: list[str]
    rejected_critiques: list[str]


@torch.no_grad()
def score_pairs(model: RewardModel, collator: Collator, pairs: Sequence[PreferencePair | Example], *,
                critique: bool, max_new_tokens: int, temperature: float) -> Scores:
    """Rewards (and critiques) of B pairs: 2B generated critiques (when `critique`), then one scoring
    forward pass over the 2B rows (chosen rows first, see collate.py)."""
    examples = collator.examples(pairs)  # media loaded once for both passes
    count = len(examples)
    chosen_critiques = rejected_critiques = [""] * count
    if critique:
        prompts = collator.generation(examples)
        texts = model.generate_critiques(prompts, collator, max_new_tokens=max_new_tokens,
                                         temperature=temperature)  # (2B,) texts
        chosen_critiques, rejected_critiques = prompts.split(texts)
        batch = collator.reward(examples, critique=True,
                                critiques=list(zip(chosen_critiques, rejected_critiques, strict=True)))
    else:
        batch = collator.reward(examples, critique=False)
    chosen, rejected = batch.split(model(batch).scores.float().cpu().tolist())  # (2B,) -> (B,), (B,)
    return Scores(chosen, rejected, list(chosen_critiques), list(rejected_critiques))
