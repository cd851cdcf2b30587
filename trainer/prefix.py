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

Packing (`share(batch, pack=True)`, stages.dpo.packing): several pairs' sequences follow each other in
one row with no padding between them, so short pairs do not pay for the longest one:

    row 0: [ pair 0 | pair 1 | pair 2 ]        row 1: [ pair 3 | pair 4 | pad ]

The mask is block-diagonal across pairs on top of the segment rules above (a token never sees another
pair's), and positions restart per pair because every token keeps its plain row's position (mRoPE
included). Rows are at most as wide as the longest pair (never wider than the unpacked layout: SDPA
with a mask computes every query x key block of a row, so one long row would cost more attention than
it saves); pairs fill them first fit decreasing (pack_rows), within a row in pair order. The model
places vision features over the image tokens in row-major order, so logprobs.forward_hidden hands
them over in `Layout.packed_order` (each image's or video's features follow their pair).
"""

from __future__ import annotations

import dataclasses

import torch

from mmalign.trainer.collate import Batch

PREFIX, CHOSEN, REJECTED, PAD = 0, 1, 2, -1  # segment ids of the packed tokens


@dataclasses.dataclass
class Layout:
    """Where every real token of the plain batch (R = 2B rows, T columns) sits in the packed one
    (N rows, S columns; N = B unpacked, N <= B packed), and back."""

    input_ids: torch.Tensor  # (N, S) packed tokens, padding at the end of each row
    segment: torch.Tensor  # (N, S) PREFIX | CHOSEN | REJECTED | PAD
    owner: torch.Tensor  # (N, S) the pair a packed token belongs to (-1 for padding)
    source_row: torch.Tensor  # (N, S) the plain row a packed token comes from (the chosen row for the prefix)
    source_column: torch.Tensor  # (N, S) its column in that row (0 for padding)
    slot: torch.Tensor  # (R, T) the packed column of each plain token (-1 for padding)
    row_of_pair: torch.Tensor  # (B,) the packed row holding each pair
    packed_order: list[int]  # the pairs in row-major order (where their vision features go)
    prefix_lengths: list[int]  # per pair: tokens shared by both rows
    pair_lengths: list[int]  # per pair: its sequence's tokens, chosen + rejected - shared prefix

    @property
    def pairs(self) -> int:
        return len(self.prefix_lengths)

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    def pair_of_row(self, rows: torch.Tensor) -> torch.Tensor:
        """(M,) packed row of plain rows `rows` (row r belongs to pair r mod B)."""
        return self.row_of_pair[rows % self.pairs]

    def allowed(self) -> torch.Tensor:
        """(N, 1, S, S) bool: query s may attend to key s'. Causal in packed order, within one pair,
        padding keys never (padding queries see themselves only, so no softmax row is empty: no NaN to
        reach backward), prefix keys from every segment, other keys from the query's own segment only."""
        segment = self.segment
        length = segment.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()  # (S, S)
        query, key = segment[:, :, None], segment[:, None, :]  # (N, S, 1), (N, 1, S)
        same_pair = self.owner[:, :, None] == self.owner[:, None, :]  # (N, S, S)
        visible = (query != PAD) & (key != PAD) & ((key == PREFIX) | (key == query)) & causal & same_pair
        diagonal = torch.eye(length, dtype=torch.bool, device=segment.device)
        return (visible | diagonal)[:, None]

    def gather(self, per_token: torch.Tensor) -> torch.Tensor:
        """A plain (..., R, T) per-token tensor (positions) -> packed (..., N, S)."""
        return per_token[..., self.source_row, self.source_column]


def pack_rows(lengths: list[int], width: int) -> list[int]:
    """The row of each item when items of `lengths` are packed into rows of `width`: first fit
    decreasing (longest first, each into the first row with room, else a new row); an item longer than
    `width` gets a row of its own. Deterministic: ties go by position."""
    rows: list[int] = [0] * len(lengths)
    used: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, taken in enumerate(used) if taken + lengths[item] <= width), len(used))
        if row == len(used):
            used.append(0)
        used[row] += lengths[item]
        rows[item] = row
    return rows


def share(batch: Batch, vision_token_ids: frozenset[int] = frozenset(), pack: bool = False) -> Layout:
    """The layout of a (chosen, rejected) batch: one row per pair, or with `pack` several pairs per row
    (next fit in pair order into rows as wide as the longest pair). `vision_token_ids`: the model's
    image/video placeholder ids; a pair whose continuation would hold one is refused (its features
    would be placed twice)."""
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
    row_of_pair = pack_rows(lengths, width) if pack else list(range(pairs))
    offsets, used = [], [0] * (max(row_of_pair) + 1)  # per pair: its first column in its row (pair order)
    for pair, row in enumerate(row_of_pair):
        offsets.append(used[row])
        used[row] += lengths[pair]
    shape = (len(used), max(used))
    input_ids = torch.full(shape, batch.pad_token_id, dtype=torch.long)
    segment = torch.full(shape, PAD, dtype=torch.long)
    owner = torch.full(shape, -1, dtype=torch.long)
    source_row = torch.zeros(shape, dtype=torch.long)
    source_column = torch.zeros(shape, dtype=torch.long)
    slot = torch.full(real.shape, -1, dtype=torch.long)
    for i, length in enumerate(prefix_lengths):
        chosen, rejected = columns[i], columns[pairs + i]
        rest = rejected[length:]
        row, start = row_of_pair[i], offsets[i]
        middle, end = start + len(chosen), start + len(chosen) + len(rest)
        input_ids[row, start:middle] = ids[i, chosen]
        input_ids[row, middle:end] = ids[pairs + i, rest]
        segment[row, start : start + length] = PREFIX
        segment[row, start + length : middle] = CHOSEN
        segment[row, middle:end] = REJECTED
        owner[row, start:end] = i
        source_row[row, start:middle] = i
        source_row[row, middle:end] = pairs + i
        source_column[row, start:middle] = chosen
        source_column[row, middle:end] = rest
        slot[i, chosen] = torch.arange(start, middle)
        slot[pairs + i, rejected[:length]] = torch.arange(start, start + length)
        slot[pairs + i, rest] = torch.arange(middle, end)
    # Padding reads (row 0, column 0) of the plain batch: any real position; its keys are masked.
    device = batch.input_ids.device
    return Layout(
        input_ids=input_ids.to(device),
        segment=segment.to(device),
        owner=owner.to(device),
        source_row=source_row.to(device),
        source_column=source_column.to(device),
        slot=slot.to(device),
        row_of_pair=torch.tensor(row_of_pair, dtype=torch.long, device=device),
        packed_order=sorted(range(pairs), key=lambda pair: (row_of_pair[pair], pair)),
        prefix_lengths=prefix_lengths,
        pair_lengths=lengths,
    )
