"""Prefix sharing: ONE sequence per (chosen, rejected) pair, the shared prompt computed once.

    layout = prefix.share(batch)                  # batch: collate.Batch of 2B rows (Collator.pairs)
    hidden = logprobs.forward_hidden(model, batch, layout)          # (B, S, H), one row per pair
    out = logprobs.sequence_logprobs(model, hidden, batch, layout=layout)   # (2B,) as the plain path

A pair's two rows repeat the same prompt (system text, question, hundreds to thousands of image
tokens); the plain path runs the language model over it twice. Here each pair becomes

    [ prompt | chosen response | rejected response | padding ]

with a block attention mask: prompt tokens attend causally to the prompt, chosen tokens to the prompt
and to earlier chosen tokens, rejected tokens to the prompt and to earlier rejected tokens (never to
the chosen ones). Each token keeps the position it has in its plain row, so the rejected response
continues from the prompt's end: 1-D positions for text LMs and LLaVA-OneVision, the model's own 3-D
mRoPE positions for Qwen2-VL / Qwen2.5-VL (logprobs.row_positions). Every token then sees exactly the
keys, values and positions it sees in the plain path: log-probs and gradients equal the plain path's
to float tolerance (tests/unit/test_prefix_sharing.py).

Why a block mask and not a KV cache of the prompt reused by both continuations: one forward, with
gradients flowing through the prompt for free (autograd sees an ordinary forward), no cache objects
under ZeRO-3 or gradient checkpointing, and one code path for every family. Its cost: attention over
S = prompt + chosen + rejected tokens computes the masked chosen x rejected block too, which is small
beside the MLPs and attention of a prompt that is no longer run twice. It needs an attention kernel
that takes an arbitrary mask: SDPA (a boolean mask) or eager (an additive one), not flash-attention-2.

The shared prefix is the longest common token prefix of the two rows, ended before the first scored
token (response or critique) of either. Rows whose prompts were cut differently by truncation (the
prompt text is cut until the longer row fits data.maxLength) share only the tokens before the cut,
and each continuation carries the rest of its own prompt: still exact. Vision tokens must lie in the
shared prefix (the template puts them first, and they are never cut), so they are embedded once.
"""

from __future__ import annotations

import dataclasses

import torch

from mmalign.trainer.collate import Batch

PREFIX, CHOSEN, REJECTED, PAD = 0, 1, 2, -1  # segment ids of the packed tokens


@dataclasses.dataclass
class Layout:
    """Where every real token of the plain batch (R = 2B rows, T columns) sits in the packed one
    (B rows, S columns), and back."""

    input_ids: torch.Tensor  # (B, S) packed tokens, padding at the end of each row
    segment: torch.Tensor  # (B, S) PREFIX | CHOSEN | REJECTED | PAD
    source_row: torch.Tensor  # (B, S) the plain row a packed token comes from (the chosen row for the prefix)
    source_column: torch.Tensor  # (B, S) its column in that row (0 for padding)
    slot: torch.Tensor  # (R, T) the packed column of each plain token (-1 for padding)
    prefix_lengths: list[int]  # per pair: tokens shared by both rows

    @property
    def pairs(self) -> int:
        return int(self.input_ids.shape[0])

    def pair_of_row(self, rows: torch.Tensor) -> torch.Tensor:
        """(N,) packed row of plain rows `rows` (row r belongs to pair r mod B)."""
        return rows % self.pairs

    def allowed(self) -> torch.Tensor:
        """(B, 1, S, S) bool: query s may attend to key s'. Causal in packed order, padding keys never
        (padding queries see themselves only, so no softmax row is empty: no NaN to reach backward),
        prefix keys from every segment, other keys from the query's own segment only."""
        segment = self.segment
        length = segment.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()  # (S, S)
        query, key = segment[:, :, None], segment[:, None, :]  # (B, S, 1), (B, 1, S)
        visible = (query != PAD) & (key != PAD) & ((key == PREFIX) | (key == query)) & causal
        diagonal = torch.eye(length, dtype=torch.bool, device=segment.device)
        return (visible | diagonal)[:, None]

    def gather(self, per_token: torch.Tensor) -> torch.Tensor:
        """A plain (..., R, T) per-token tensor (positions) -> packed (..., B, S)."""
        return per_token[..., self.source_row, self.source_column]


def share(batch: Batch, vision_token_ids: frozenset[int] = frozenset()) -> Layout:
    """The packed layout of a (chosen, rejected) batch. `vision_token_ids`: the model's image/video
    placeholder ids; a pair whose continuation would hold one is refused (its features would be
    placed twice)."""
    if batch.repeats != 2:
        raise ValueError(f"prefix sharing needs a (chosen, rejected) batch, got repeats {batch.repeats}")
    pairs = batch.pairs
    real = batch.attention_mask.bool().cpu()  # (R, T)
    ids = batch.input_ids.cpu()
    scored = batch.response_mask.cpu().clone()
    if batch.critique_mask is not None:
        scored |= batch.critique_mask.cpu()
    columns: list[torch.Tensor] = [real[r].nonzero().squeeze(1) for r in range(batch.rows)]  # real columns
    prefix_lengths, lengths = [], []
    for i in range(pairs):
        chosen, rejected = columns[i], columns[pairs + i]
        a, b = ids[i, chosen], ids[pairs + i, rejected]
        common = min(len(a), len(b))
        differ = (a[:common] != b[:common]).nonzero()
        length = int(differ[0]) if len(differ) else common
        # Stop before the first scored token of either row: its prediction needs the row's own state.
        for row, row_columns in ((i, chosen), (pairs + i, rejected)):
            first = scored[row, row_columns].nonzero()
            if len(first):
                length = min(length, int(first[0]))
        if vision_token_ids:
            for row_ids in (a, b):
                tail = row_ids[length:].tolist()
                if any(t in vision_token_ids for t in tail):
                    raise ValueError(
                        f"prefix sharing: pair {i} of the batch has image/video tokens after its shared "
                        "prompt; set stages.dpo.prefixSharing: false for this data"
                    )
        prefix_lengths.append(length)
        lengths.append(len(a) + len(b) - length)
    width = max(lengths)
    shape = (pairs, width)
    input_ids = torch.full(shape, batch.pad_token_id, dtype=torch.long)
    segment = torch.full(shape, PAD, dtype=torch.long)
    source_row = torch.zeros(shape, dtype=torch.long)
    source_column = torch.zeros(shape, dtype=torch.long)
    slot = torch.full(real.shape, -1, dtype=torch.long)
    for i, length in enumerate(prefix_lengths):
        chosen, rejected = columns[i], columns[pairs + i]
        rest = rejected[length:]
        end = len(chosen) + len(rest)
        input_ids[i, : len(chosen)] = ids[i, chosen]
        input_ids[i, len(chosen) : end] = ids[pairs + i, rest]
        segment[i, :length] = PREFIX
        segment[i, length : len(chosen)] = CHOSEN
        segment[i, len(chosen) : end] = REJECTED
        source_row[i, : len(chosen)] = i
        source_row[i, len(chosen) : end] = pairs + i
        source_row[i, end:] = i
        source_column[i, : len(chosen)] = chosen
        source_column[i, len(chosen) : end] = rest
        slot[i, chosen] = torch.arange(len(chosen))
        slot[pairs + i, rejected[:length]] = torch.arange(length)
        slot[pairs + i, rest] = torch.arange(len(chosen), end)
    device = batch.input_ids.device
    return Layout(
        input_ids=input_ids.to(device),
        segment=segment.to(device),
        source_row=source_row.to(device),
        source_column=source_column.to(device),
        slot=slot.to(device),
        prefix_lengths=prefix_lengths,
    )
