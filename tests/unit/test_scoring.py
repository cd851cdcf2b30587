"""trainer/scoring.py: the score stage's decode loop writes the critiques `model.generate` writes, one
sample at a time, and its scores (fused into the loop where the tokens agree) equal the separate
scoring forward; length-sorted batches keep the input order."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from mmalign.trainer import collate, models, scoring
from mmalign.trainer.template import Example

ARCHITECTURES = ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-llava-onevision", "tiny-text")


def _examples(text_only: bool) -> list[Example]:
    red, blue = Image.new("RGB", (48, 40), (220, 30, 30)), Image.new("RGB", (32, 32), (30, 60, 220))
    rows = [
        ("What colour is the image?", "The image is red.", "It is blue, I think."),
        ("Describe the image in a few more words, please.", "Blue.", "The whole image is filled with green."),
        ("Colour?", "Red", "A square"),
        ("Is there a person standing in the picture?", "No person.", "Yes, a person is standing there."),
    ]
    return [Example(p, c, r, [] if text_only else [(red, blue)[i % 2]]) for i, (p, c, r) in enumerate(rows)]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def reward_model(request: pytest.FixtureRequest) -> tuple[str, models.RewardModel, Any]:
    model, processor = models.load_reward_model(f"builtin://{request.param}", seed=0)
    return request.param, model.eval(), processor


def _one_by_one(
    model: models.RewardModel, collator: collate.Collator, examples: list[Example], max_new_tokens: int
) -> list[str]:
    """The naive reference: `model.base.generate` on each unpadded prompt alone; rows chosen then rejected."""
    texts: list[list[str]] = [[], []]
    for example in examples:
        prompts = collator.generation([example])
        for row in range(2):
            keep = prompts.attention_mask[row].bool()
            inputs = {k: v[row : row + 1, keep] for k, v in prompts.text_inputs().items()}
            out = model.base.generate(  # type: ignore[operator]
                **inputs,
                **prompts.vision,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=collator.end_of_turn_ids,
                pad_token_id=collator.template.pad_token_id,
            )
            new = out[0, inputs["input_ids"].shape[1] :]
            texts[row].append(collator.tokenizer.decode(new, skip_special_tokens=True).strip())
    return texts[0] + texts[1]


def test_the_loop_writes_what_generate_writes_alone_and_drops_finished_rows(
    reward_model: tuple[str, models.RewardModel, Any],
) -> None:
    name, model, processor = reward_model
    collator = collate.Collator(processor)
    examples = _examples(name == "tiny-text")
    prompts = collator.generation(examples)
    first = scoring.generate(model, prompts, collator, max_new_tokens=6, temperature=0.0)
    # Stop tokens that the rows write at different steps, so rows leave the batch at different times
    # (random-init models almost never write their end of turn by themselves).
    collator.end_of_turn_ids = sorted({*collator.end_of_turn_ids, first.fed[0][2], first.fed[1][4]})
    out = scoring.generate(model, prompts, collator, max_new_tokens=6, temperature=0.0)
    assert len({len(tokens) for tokens in out.fed}) > 1  # some rows stopped early, others ran to the limit
    assert out.texts == _one_by_one(model, collator, examples, max_new_tokens=6)
    assert out.last_hidden.shape == (prompts.rows, models.hidden_size(model.base))


class _ScriptedHead(torch.nn.Module):
    """An LM head that writes `script` whatever the hidden state (the backbone, and so the hidden
    states the score head reads, stay the model's own): critiques a random model would not write."""

    def __init__(self, script: list[int], vocab: int) -> None:
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (A, H) -> (A, V)
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return torch.nn.functional.one_hot(torch.full(hidden.shape[:1], token), self.vocab).float()


def test_scores_from_the_loop_equal_the_separate_scoring_pass(
    reward_model: tuple[str, models.RewardModel, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, model, processor = reward_model
    collator = collate.Collator(processor)
    examples = _examples(name == "tiny-text")
    tokenizer = collator.tokenizer
    script = [*collator.template.ids("Good answer."), scoring.closing_token(collator)]
    monkeypatch.setattr(model.base, "lm_head", _ScriptedHead(script, len(tokenizer)))  # type: ignore[arg-type]
    scored = scoring.score_pairs(model, collator, examples, critique=True, max_new_tokens=16, temperature=0.0)
    assert scored.chosen_critiques == scored.rejected_critiques == ["Good answer."] * len(examples)
    assert scored.fused == 2 * len(examples)  # every row scored by the loop's own last forward
    batch = collator.reward(
        examples, critique=True, critiques=[("Good answer.", "Good answer.")] * len(examples)
    )
    separate = model(batch).scores  # (2B,) the separate pass, right-padded
    torch.testing.assert_close(torch.tensor(scored.chosen + scored.rejected), separate, rtol=1e-4, atol=1e-5)


def test_length_sorted_batches_keep_input_order() -> None:
    model, processor = models.load_reward_model("builtin://tiny-qwen2-vl", seed=0)
    model.eval()
    collator = collate.Collator(processor)
    examples = _examples(False)
    order = scoring.length_order(collator, examples)
    assert sorted(order) == list(range(len(examples))) and order != list(range(len(examples)))
    whole = scoring.score_pairs(model, collator, examples, critique=True, max_new_tokens=3, temperature=0.0)
    batched = scoring.score_pairs(
        model, collator, examples, critique=True, max_new_tokens=3, temperature=0.0, batch_size=2
    )
    assert batched.chosen_critiques == whole.chosen_critiques
    assert batched.rejected_critiques == whole.rejected_critiques
    torch.testing.assert_close(torch.tensor(batched.chosen), torch.tensor(whole.chosen), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        torch.tensor(batched.rejected), torch.tensor(whole.rejected), rtol=1e-4, atol=1e-5
    )
    # random critiques rarely re-tokenize to the generated tokens: those rows take the separate pass
    batch = collator.reward(
        examples,
        critique=True,
        critiques=list(zip(whole.chosen_critiques, whole.rejected_critiques, strict=True)),
    )
    torch.testing.assert_close(
        torch.tensor(whole.chosen + whole.rejected), model(batch).scores, rtol=1e-4, atol=1e-5
    )


def test_sampling_is_seeded_and_a_scalar_model_writes_no_critiques() -> None:
    model, processor = models.load_reward_model("builtin://tiny-text", seed=0)
    collator = collate.Collator(processor)
    examples = _examples(True)
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(
            scoring.score_pairs(
                model.eval(),
                collator,
                examples,
                critique=True,
                max_new_tokens=4,
                temperature=1.0,
                batch_size=2,
            ).chosen_critiques
        )
    assert draws[0] == draws[1]
    scalar = scoring.score_pairs(model, collator, examples, critique=False, max_new_tokens=4, temperature=0.0)
    assert scalar.chosen_critiques == [""] * len(examples) and scalar.fused == 0
