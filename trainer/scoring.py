"""Critique, then score: how a reward model judges (chosen, rejected) pairs, the same way wherever it runs.

    scored = scoring.score_pairs(model, collator, pairs, critique=True, max_new_tokens=1024, temperature=0.0,
                                 batch_size=16)
    scored.chosen, scored.rejected                      # rewards r(y_w), r(y_l) per pair, in input order
    scored.chosen_critiques, scored.rejected_critiques  # generated critiques ("" for a scalar model)
    scored.fused                                        # rows whose score came from the generation pass

Used by the reward stage's held-out evaluation and by the score stage (its δ = r(y_w) − r(y_l)), so
Acc/Acc+ measured while training is measured the way the scores DPO trains on are made. A critique
reward model GENERATES its critique of each response (the annotated critiques would leak the label),
then scores (prompt, response, generated critique); a scalar one scores (prompt, response).

Throughput (bench/scoring.py measures it against a per-sample `model.generate` loop):
  * length-sorted batches: with `batch_size`, the pairs (a shard) are sorted by the text length of
    prompt + longer response and cut into batches of `batch_size` pairs, so a batch pads little; each
    batch loads its own media; results come back in input order.
  * one decode loop (`generate`): a left-padded prefill (vision once per pair, logprobs.encode_vision)
    fills a KV cache, then one token per step for every live row; a row that ends its turn (or reaches
    `max_new_tokens`) leaves the batch at once (its cache rows are dropped), so short critiques stop
    costing compute. Per step the Python work is constant: all rows move in one tensor op.
  * scores in the same pass: the score head reads the hidden state at the last token of (prompt,
    response, critique request, critique + end of turn). The loop feeds each row's end-of-turn token
    too (generate itself never runs the token it stops on), so that state comes from the loop's own
    last forward. It is used only where the row the score pass would build is token for token the
    prompt plus the fed tokens (checked per row: a decoded critique can re-tokenize differently, and
    data.maxLength can cut a critique); the other rows are scored by the separate forward as before.
    tests/unit/test_scoring.py checks the fused scores equal the separate pass to float tolerance.
Sampling (`temperature` > 0) draws from softmax(logits / temperature) over the whole vocabulary (no
top-k/top-p), with the global torch RNG (the score stage seeds it per shard).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, cast

import torch

from mmalign.trainer import logprobs
from mmalign.trainer.collate import Batch, Collator
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
    fused: int = 0  # rows (of 2B) scored from the generation's own last forward
    generated_tokens: int = 0  # critique tokens generated, end-of-turn tokens included


@dataclasses.dataclass
class Generated:
    """What `generate` gives for R rows of a `collator.generation` batch."""

    texts: list[str]  # (R,) decoded critique, special tokens dropped, stripped
    fed: list[list[int]]  # (R,) tokens fed after the prompt: the critique and its end of turn
    last_hidden: torch.Tensor  # (R, H) hidden state at each row's last fed token


def closing_token(collator: Collator) -> int | None:
    """The token the template ends a critique turn with (the last token of a reward row), or None when
    it is not one of the generation's stop tokens (then no row's score can come from the loop)."""
    probe = Example("Question?", "Answer.", "Other.")
    text = collator.template.pieces(probe, "chosen", critique="Fine.")[-1][0]
    ids = collator.template.ids(text)
    return ids[-1] if ids and ids[-1] in collator.end_of_turn_ids else None


def _positions(model: Any, batch: Batch) -> torch.Tensor:
    """Prefill position ids of a left-padded batch, counted from each row's first real token (what the
    right-padded score pass uses): (R, T), or (3, R, T) multimodal RoPE for Qwen2-VL / Qwen2.5-VL."""
    mask = batch.attention_mask
    flat = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (R, T)
    if batch.kind != "qwen":
        return flat
    grids = {
        k: torch.cat([batch.vision[k]] * batch.repeats)
        for k in ("image_grid_thw", "video_grid_thw")
        if k in batch.vision
    }
    if not grids:
        return flat[None].expand(3, -1, -1)
    positions: torch.Tensor = model.model.get_rope_index(
        batch.input_ids, batch.mm_token_type_ids, attention_mask=mask, **grids
    )[0]
    return positions  # (3, R, T)


@torch.no_grad()
def generate(
    model: RewardModel, batch: Batch, collator: Collator, *, max_new_tokens: int, temperature: float
) -> Generated:
    """Critiques of the R rows of a left-padded `collator.generation` batch, greedy when temperature
    is 0 (the tokens `model.base.generate` picks), and the hidden state at each row's end of turn."""
    from transformers import DynamicCache

    base: Any = model.base  # a transformers model: its decoder stack and LM head
    backbone, head = base.model, base.get_output_embeddings()
    rows, device = batch.rows, batch.input_ids.device
    stop = torch.tensor(collator.end_of_turn_ids, device=device)
    close = closing_token(collator)
    close = int(stop[0]) if close is None else close  # forced at the limit: ends the turn the score reads
    pad = collator.template.pad_token_id

    kwargs: dict[str, Any] = batch.text_inputs()
    features = logprobs.encode_vision(base, batch)
    if features is not None:
        kwargs["mm_encoder_outputs"] = features
        if batch.kind == "qwen":
            for key in ("image_grid_thw", "video_grid_thw"):
                if key in batch.vision:
                    kwargs[key] = torch.cat([batch.vision[key]] * batch.repeats)
    positions = _positions(base, batch)
    cache = DynamicCache(config=base.config.get_text_config())
    hidden = backbone(
        **kwargs, position_ids=positions, past_key_values=cache, use_cache=True
    ).last_hidden_state[:, -1]  # (R, H) at each prompt's last token
    position = positions.amax(dim=-1) + 1  # (R,) or (3, R): where each row's next token goes
    attention = batch.attention_mask

    fed = torch.full((rows, max_new_tokens + 1), pad, dtype=torch.long, device=device)  # (R, new + 1)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    last_hidden = torch.empty_like(hidden)  # (R, H)
    alive = torch.arange(rows, device=device)  # original index of each live row
    for step in range(max_new_tokens + 1):
        if step == max_new_tokens:  # the limit: end the turn, as the score pass's row does
            token = torch.full_like(alive, close)
        else:
            logits = head(hidden).float()  # (A, V)
            if temperature > 0:
                token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1).squeeze(-1)
            else:
                token = logits.argmax(dim=-1)  # (A,)
        fed[alive, step] = token
        lengths[alive] += 1
        attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
        step_positions = position[..., None] + step  # (A, 1) or (3, A, 1)
        hidden = backbone(
            input_ids=token[:, None],
            attention_mask=attention,
            position_ids=step_positions,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]  # (A, H)
        done = torch.isin(token, stop) if step < max_new_tokens else torch.ones_like(token, dtype=torch.bool)
        last_hidden[alive[done]] = hidden[done]
        keep = (~done).nonzero().squeeze(-1)  # one host sync per step, as generate's stopping criteria
        if keep.numel() == 0:
            break
        if keep.numel() < alive.numel():  # finished rows leave the batch and the cache
            for layer in cast(list[Any], cache.layers):  # DynamicLayer: keys/values (A, heads, T, d)
                layer.batch_select_indices(keep)
            alive, hidden, attention = alive[keep], hidden[keep], attention[keep]
            position = position[..., keep]

    counts = lengths.tolist()
    tokens = [row[:count] for row, count in zip(fed.tolist(), counts, strict=True)]
    # the token forced at the limit is not part of the text; a produced end of turn is special: dropped
    generated = [row[:max_new_tokens] for row in tokens]
    texts = [t.strip() for t in collator.tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return Generated(texts=texts, fed=tokens, last_hidden=last_hidden)


def _same_rows(prompts: Batch, fed: list[list[int]], scored: Batch) -> list[bool]:
    """Per row: does the score pass's row hold exactly the generation prompt + the fed tokens?"""
    same = []
    for i, tokens in enumerate(fed):
        prompt = prompts.input_ids[i][prompts.attention_mask[i].bool()].tolist()
        row = scored.input_ids[i][scored.attention_mask[i].bool()].tolist()
        same.append(row == prompt + tokens)
    return same


def length_order(collator: Collator, items: Sequence[PreferencePair | Example]) -> list[int]:
    """Indices of `items` by the text tokens of prompt + longer response, shortest first: batches cut
    from this order pad little. A sort key only, read without loading any media (a pair's image and
    video tokens are not counted) and without the template's fixed markers."""
    texts = [item.prompt + " " + max(item.chosen, item.rejected, key=len) for item in items]
    lengths = [len(ids) for ids in collator.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return sorted(range(len(items)), key=lambda i: lengths[i])


@torch.no_grad()
def score_pairs(
    model: RewardModel,
    collator: Collator,
    pairs: Sequence[PreferencePair | Example],
    *,
    critique: bool,
    max_new_tokens: int,
    temperature: float,
    batch_size: int | None = None,
) -> Scores:
    """Rewards (and critiques) of B pairs, in input order. `batch_size`: pairs per batch, the pairs
    sorted by length first (see the module doc), each batch's media loaded when it is scored; None:
    all B pairs in one batch, unsorted."""
    if batch_size is None or batch_size >= len(pairs):
        return _score_batch(model, collator, collator.examples(pairs), critique, max_new_tokens, temperature)
    order = length_order(collator, pairs)
    count = len(pairs)
    chosen, rejected = [0.0] * count, [0.0] * count
    chosen_critiques, rejected_critiques = [""] * count, [""] * count
    fused = tokens = 0
    for start in range(0, count, batch_size):
        part = order[start : start + batch_size]
        scored = _score_batch(
            model,
            collator,
            collator.examples([pairs[i] for i in part]),
            critique,
            max_new_tokens,
            temperature,
        )
        for k, i in enumerate(part):  # back to input order
            chosen[i], rejected[i] = scored.chosen[k], scored.rejected[k]
            chosen_critiques[i], rejected_critiques[i] = (
                scored.chosen_critiques[k],
                scored.rejected_critiques[k],
            )
        fused, tokens = fused + scored.fused, tokens + scored.generated_tokens
    return Scores(chosen, rejected, chosen_critiques, rejected_critiques, fused, tokens)


def _score_batch(
    model: RewardModel,
    collator: Collator,
    examples: list[Example],
    critique: bool,
    max_new_tokens: int,
    temperature: float,
) -> Scores:
    """One batch: 2B critiques generated (when `critique`), then 2B scores: from the loop's last forward
    where the rows agree, else from one scoring forward over the pairs that need it."""
    count = len(examples)
    if not critique:
        batch = collator.reward(examples, critique=False)
        chosen, rejected = batch.split(model(batch).scores.float().cpu().tolist())  # (2B,) -> (B,), (B,)
        return Scores(chosen, rejected, [""] * count, [""] * count)
    prompts = collator.generation(examples)
    out = generate(model, prompts, collator, max_new_tokens=max_new_tokens, temperature=temperature)
    chosen_critiques, rejected_critiques = prompts.split(out.texts)
    critiques = list(zip(chosen_critiques, rejected_critiques, strict=True))
    batch = collator.reward(examples, critique=True, critiques=critiques)  # tokens only: no forward yet
    same = _same_rows(prompts, out.fed, batch)
    head = model.score_head
    scores = head(out.last_hidden.to(head.dense.weight.dtype)).float().cpu().tolist()  # (2B,)
    redo = [i for i in range(count) if not (same[i] and same[count + i])]  # pairs with a row to rescore
    if redo:
        again = (
            batch
            if len(redo) == count
            else collator.reward(
                [examples[i] for i in redo], critique=True, critiques=[critiques[i] for i in redo]
            )
        )
        redone = again.split(model(again).scores.float().cpu().tolist())  # (2P,) -> (P,), (P,)
        for k, i in enumerate(redo):  # only the rows that differ: the other row of the pair keeps its own
            for row, value in ((i, redone[0][k]), (count + i, redone[1][k])):
                scores[row] = scores[row] if same[row] else value
    chosen, rejected = prompts.split(scores)
    return Scores(
        chosen,
        rejected,
        list(chosen_critiques),
        list(rejected_critiques),
        sum(same),
        sum(len(tokens) for tokens in out.fed),
    )
