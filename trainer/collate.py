"""Token batches for the three stages: (chosen, rejected) pairs, reward sequences, generation prompts.

A stage builds ONE Collator when it starts (processor, media loader, max length, device; the chat
template is read from the processor once) and turns preference pairs (or ready `Example`s) into batches:

    collator = collate.Collator(processor, loader, max_length=2048, device=dist.device)
    batch = collator.pairs(pairs)                          # B pairs -> 2B rows, 1 forward (DPO)
    batch = collator.reward(pairs, critique=True)          # RM: + annotated critique tokens
    batch = collator.reward(pairs, critiques=generated)    # RM: + the given (chosen, rejected) critiques
    batch = collator.generation(pairs)                     # left-padded critique-generation prompts
    chosen, rejected = batch.split(logps)                  # (2B, ...) per-row values -> (B, ...) halves

Row order is always [chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]: `Batch.split` is the
one place that slices the halves.

Images are processed ONCE per pair. `Batch.vision` holds the processor's pixel tensors for the B pairs
only; `logprobs.forward_hidden` runs the vision encoder on them once and hands the resulting features
to the language model for both rows of every pair (`mm_encoder_outputs`, transformers >= 5): one
vision pass per pair and model instead of TRL's two (so 2 instead of 4 per pair with a reference model,
1 with precomputed reference log-probs). Per architecture:
  * Qwen2-VL / Qwen2.5-VL: features are per-image token rows; the language model also gets
    `image_grid_thw` repeated per row (for its 3-D RoPE positions) and `mm_token_type_ids`.
  * LLaVA-OneVision: features are the packed anyres tiles + newline tokens per image; repeated per row.
  * text models: no vision inputs (a pair's images are ignored).
Videos (frame folders) enter as their sampled frames, one image placeholder per frame, for every
architecture (Qwen's temporal video patches are not used: simpler, costs more tokens).
`Batch.model_inputs()` gives plain HF forward kwargs with the pixels duplicated (a reference path for
tests, and what `generate` needs).

Sequences are built from pieces tokenized separately, so masks are exact:
  prompt   = chat header + vision placeholders + prompt + assistant header   (processor: expands images)
  response = response text + end-of-turn                                    (response_mask = 1)
  critique = critique request + critique text + end-of-turn                 (critique_mask on the text)
Truncation to `max_length` cuts the critique first, then the response (at least 1 response token stays);
prompts are never cut (their image tokens must stay whole).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from mmalign.trainer.data import PreferencePair
    from mmalign.trainer.media import MediaLoader

CRITIQUE_REQUEST = "Critique the answer above."

_Rows = TypeVar("_Rows", torch.Tensor, list[Any])  # per-row values of a batch: a (R, ...) tensor or a list


@dataclasses.dataclass
class Example:
    """What collation needs from one preference pair (images already loaded)."""

    prompt: str
    chosen: str
    rejected: str
    images: list[Any] = dataclasses.field(default_factory=list)  # PIL images; video = its frames
    chosen_critique: str = ""
    rejected_critique: str = ""

    @classmethod
    def from_pair(cls, pair: Any, images: list[Any]) -> Example:
        return cls(prompt=pair.prompt, chosen=pair.chosen, rejected=pair.rejected, images=images,
                   chosen_critique=pair.chosen_critique, rejected_critique=pair.rejected_critique)


@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor  # (R, T) R = repeats * P rows
    attention_mask: torch.Tensor  # (R, T) 1 = real token
    response_mask: torch.Tensor  # (R, T) bool: response tokens (their log-probs count)
    critique_mask: torch.Tensor | None  # (R, T) bool: critique tokens (LM labels of the reward model)
    mm_token_type_ids: torch.Tensor | None  # (R, T) Qwen2-VL: 1 at image tokens
    vision: dict[str, torch.Tensor]  # processor pixel inputs for the P pairs (not duplicated)
    repeats: int  # rows k*P + i use pair i's images, k < repeats
    kind: str  # "qwen" | "llava" | "text"

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def pairs(self) -> int:
        return self.rows // self.repeats

    def split(self, values: _Rows) -> tuple[_Rows, _Rows]:
        """(chosen, rejected): the halves [:B] and [B:] of a per-row (2B, ...) tensor or list of 2B
        values (log-probs, scores, generated texts) of this batch's rows."""
        if self.repeats != 2 or len(values) != self.rows:
            raise ValueError(f"split: expected {self.rows} values of a (chosen, rejected) batch, "
                             f"got {len(values)} (repeats {self.repeats})")
        return values[:self.pairs], values[self.pairs:]

    def last_token_index(self) -> torch.Tensor:
        """(R,) index of each row's last real token (right padding): where a score head reads."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (self.attention_mask.bool() * positions).amax(dim=1)

    def to(self, device: torch.device | str) -> Batch:
        def move(value: Any) -> Any:
            return value.to(device) if isinstance(value, torch.Tensor) else value

        return dataclasses.replace(
            self, input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
            response_mask=move(self.response_mask), critique_mask=move(self.critique_mask),
            mm_token_type_ids=move(self.mm_token_type_ids),
            vision={k: move(v) for k, v in self.vision.items()},
        )

    def text_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.mm_token_type_ids is not None:
            inputs["mm_token_type_ids"] = self.mm_token_type_ids
        return inputs

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """HF forward/generate kwargs with every pair's pixels repeated for each of its rows."""
        inputs = self.text_inputs()
        inputs.update({k: torch.cat([v] * self.repeats) for k, v in self.vision.items()})
        return inputs


# ------------------------------------------------------------------------------------ templates


class Template:
    """Chat formatting and vision placeholders for one processor (read once from its class)."""

    def __init__(self, processor: Any) -> None:
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.processor = processor
        name = type(processor).__name__.lower()
        if self.tokenizer is processor:
            self.kind = "text"  # a text model ignores the pairs' images
        elif "qwen2vl" in name or "qwen2_5_vl" in name:
            self.kind = "qwen"
        elif "llavaonevision" in name:
            self.kind = "llava"
        else:
            raise ValueError(f"unsupported processor {type(processor).__name__}: mmalign supports Qwen2-VL, "
                             "Qwen2.5-VL, LLaVA-OneVision and text-only causal LMs")
        vocab = self.tokenizer.get_vocab()
        self.chat = "<|im_start|>" in vocab and "<|im_end|>" in vocab
        self.end = "<|im_end|>" if self.chat else (self.tokenizer.eos_token or "")
        if self.kind == "qwen":
            self.vision = "<|vision_start|>" + processor.image_token + "<|vision_end|>"
        elif self.kind == "llava":
            self.vision = processor.image_token + "\n"
        else:
            self.vision = ""

    def prompt(self, text: str, images: int) -> str:
        body = self.vision * images + text
        if self.chat:
            return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
        return body + "\n"

    def critique_request(self) -> str:
        if self.chat:
            return f"\n<|im_start|>user\n{CRITIQUE_REQUEST}<|im_end|>\n<|im_start|>assistant\n"
        return f"\n{CRITIQUE_REQUEST}\n"

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _encode_prompts(template: Template, examples: list[Example]) -> tuple[list[list[int]], list[list[int]] | None, dict[str, torch.Tensor]]:
    """Prompt token ids per example (image placeholders expanded), mm token types, pixel inputs."""
    texts = [template.prompt(e.prompt, len(e.images) if template.kind != "text" else 0) for e in examples]
    if template.kind == "text" or not any(e.images for e in examples):
        return [template.ids(t) for t in texts], None, {}
    encoded = template.processor(text=texts, images=[e.images for e in examples], padding=True,
                                 return_tensors="pt")
    keep = encoded["attention_mask"].bool()  # (P, T') padding side does not matter
    ids = [row[mask].tolist() for row, mask in zip(encoded["input_ids"], keep, strict=True)]
    types = None
    if "mm_token_type_ids" in encoded:
        types = [row[mask].tolist() for row, mask in zip(encoded["mm_token_type_ids"], keep, strict=True)]
    vision_keys = ("pixel_values", "image_grid_thw", "image_sizes", "batch_num_images")
    vision = {k: encoded[k] for k in vision_keys if k in encoded}
    return ids, types, vision


@dataclasses.dataclass
class _Row:
    pieces: list[tuple[list[int], str]]  # (token ids, role) with role in prompt|response|request|critique
    mm_types: list[int] | None


def _truncate(row: _Row, max_length: int) -> _Row:
    """Cut critique, then response tokens from the end until the row fits (>= 1 response token)."""
    total = sum(len(ids) for ids, _ in row.pieces)
    for role in ("critique", "request", "response"):
        for index in range(len(row.pieces) - 1, -1, -1):
            ids, piece_role = row.pieces[index]
            if total <= max_length or piece_role != role:
                continue
            floor = 1 if role == "response" else 0
            cut = min(total - max_length, len(ids) - floor)
            row.pieces[index] = (ids[: len(ids) - cut], role)
            total -= cut
    return row


def _pad(rows: list[_Row], pad_id: int, kind: str, repeats: int, vision: dict[str, torch.Tensor],
         left: bool = False) -> Batch:
    length = max(sum(len(ids) for ids, _ in r.pieces) for r in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    response = torch.zeros(shape, dtype=torch.bool)
    critique = torch.zeros(shape, dtype=torch.bool)
    with_types = rows[0].mm_types is not None
    types = torch.zeros(shape, dtype=torch.long)
    for i, row in enumerate(rows):
        flat = [t for ids, _ in row.pieces for t in ids]
        start = length - len(flat) if left else 0
        input_ids[i, start:start + len(flat)] = torch.tensor(flat, dtype=torch.long)
        attention[i, start:start + len(flat)] = 1
        position = start
        for ids, role in row.pieces:
            if role == "response":
                response[i, position:position + len(ids)] = True
            elif role == "critique":
                critique[i, position:position + len(ids)] = True
            position += len(ids)
        if row.mm_types is not None:
            types[i, start:start + len(row.mm_types)] = torch.tensor(row.mm_types, dtype=torch.long)
    return Batch(input_ids=input_ids, attention_mask=attention, response_mask=response,
                 critique_mask=critique if critique.any() else None,
                 mm_token_type_ids=types if with_types else None, vision=vision, repeats=repeats, kind=kind)


# ------------------------------------------------------------------------------------ public


class Collator:
    """Pairs -> token batches for one stage, with everything but the pairs bound once.

    `processor`: the model's processor (VLM) or tokenizer (text model); `loader` loads a
    PreferencePair's images/frames (not needed when the caller passes ready `Example`s); every row is
    cut to `max_length` tokens; batches are moved to `device` (None: left on the CPU)."""

    def __init__(self, processor: Any, loader: MediaLoader | None = None, max_length: int = 2048,
                 device: torch.device | str | None = None) -> None:
        self.processor = processor
        self.template = Template(processor)  # chat markers and vision placeholders, read once
        self.loader = loader
        self.max_length = max_length
        self.device = device
        tokenizer = self.template.tokenizer
        ids = {tokenizer.convert_tokens_to_ids(self.template.end)} if self.template.end else set()
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        # Token ids that end a generated critique (`eos_token_id` for generate).
        self.end_of_turn_ids: list[int] = sorted(ids)

    @property
    def tokenizer(self) -> Any:
        return self.template.tokenizer

    def examples(self, items: Sequence[Example | PreferencePair]) -> list[Example]:
        """Each pair with its media loaded (in order); `Example`s pass through as they are."""
        out = []
        for item in items:
            if isinstance(item, Example):
                out.append(item)
            elif self.loader is None:
                raise ValueError("Collator: preference pairs need a media loader (Collator(processor, loader))")
            else:
                out.append(Example.from_pair(item, self.loader.load(item)))
        return out

    def pairs(self, items: Sequence[Example | PreferencePair]) -> Batch:
        """B pairs -> 2B rows (chosen then rejected): prompt + response; response_mask on the response."""
        return self._rows(items, lambda example, side, index: [self._response(example, side)])

    def reward(self, items: Sequence[Example | PreferencePair], critique: bool = True,
               critiques: Sequence[tuple[str, str]] | None = None) -> Batch:
        """Reward-model rows: prompt + response [+ critique request + critique]; 2B rows as above.

        `critique`: add the critique (critique_mask marks the critique text + end token); `critiques`:
        (chosen, rejected) critique texts per pair to use instead of the annotated ones (the score stage
        passes the generated critiques)."""
        template = self.template

        def pieces(example: Example, side: str, index: int) -> list[tuple[list[int], str]]:
            out = [self._response(example, side)]
            if critique:
                side_index = 0 if side == "chosen" else 1
                text = critiques[index][side_index] if critiques else getattr(example, f"{side}_critique")
                out += [(template.ids(template.critique_request()), "request"),
                        (template.ids(text + template.end), "critique")]
            return out

        return self._rows(items, pieces)

    def generation(self, items: Sequence[Example | PreferencePair]) -> Batch:
        """Left-padded critique-generation prompts: prompt + response + critique request, 2B rows
        (chosen then rejected). Feed `batch.model_inputs()` to `model.generate`; new tokens start at
        column `batch.input_ids.shape[1]`."""
        request = (self.template.ids(self.template.critique_request()), "request")
        return self._rows(items, lambda example, side, index: [self._response(example, side), request],
                          left=True)

    def _response(self, example: Example, side: str) -> tuple[list[int], str]:
        return self.template.ids(getattr(example, side) + self.template.end), "response"

    def _rows(self, items: Sequence[Example | PreferencePair],
              pieces: Callable[[Example, str, int], list[tuple[list[int], str]]], left: bool = False) -> Batch:
        """The shared shape of every batch: for side in (chosen, rejected), for each pair i: its prompt
        (images expanded once per pair) + `pieces(example, side, i)`, cut to max_length, then padded."""
        examples = self.examples(items)
        prompts, types, vision = _encode_prompts(self.template, examples)
        rows = []
        for side in ("chosen", "rejected"):
            for i, (example, prompt) in enumerate(zip(examples, prompts, strict=True)):
                row = _Row([(prompt, "prompt"), *pieces(example, side, i)], types[i] if types else None)
                rows.append(_truncate(row, self.max_length))
        batch = _pad(rows, self.template.tokenizer.pad_token_id, self.template.kind, 2, vision, left=left)
        return self._move(batch)

    def _move(self, batch: Batch) -> Batch:
        return batch if self.device is None else batch.to(self.device)
