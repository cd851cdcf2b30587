"""Token batches for the three stages: (chosen, rejected) pairs, reward sequences, generation prompts.

A stage builds ONE Collator when it starts (processor, media loader, max length, device; the chat
template is read from the processor once) and turns preference pairs (or ready `Example`s) into batches:

    collator = collate.Collator.from_spec(spec, processor, loader, dist.device)  # or Collator(processor, ...)
    batch = collator.pairs(pairs)                          # B pairs -> 2B rows, 1 forward (DPO)
    batch = collator.reward(pairs, critique=True)          # RM: + annotated critique tokens
    batch = collator.reward(pairs, critiques=generated)    # RM: + the given (chosen, rejected) critiques
    batch = collator.generation(pairs)                     # left-padded critique-generation prompts
    batch = collator.prompts(pairs)                        # left-padded prompts alone, 1 row per pair
    chosen, rejected = batch.split(logps)                  # (2B, ...) per-row values -> (B, ...) halves

Row order is always [chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]: `Batch.split` is the
one place that slices the halves.

Images are processed ONCE per pair. `Batch.vision` holds the processor's pixel tensors for the B pairs
only; `logprobs.forward_hidden` runs the vision encoder on them once and hands the resulting features
to the language model for both rows of every pair (`mm_encoder_outputs`, transformers >= 5): one
vision pass per pair and model instead of TRL's two (so 2 instead of 4 per pair with a reference model,
1 with precomputed reference log-probs). The language model then runs each row whole, or, with prefix
sharing (prefix.py, the DPO stage's default), once per pair: `prefix.share(batch)` packs a pair's two
rows after one copy of their shared prompt. Per architecture:
  * Qwen2-VL / Qwen2.5-VL: features are per-image token rows; the language model also gets
    `image_grid_thw` repeated per row (for its 3-D RoPE positions) and `mm_token_type_ids`.
  * LLaVA-OneVision: features are the packed anyres tiles + newline tokens per image; repeated per row.
  * text models: no vision inputs (a pair's images are ignored).
Videos (frame folders) enter every VLM as the model's own video input (`videos=`): Qwen2-VL /
Qwen2.5-VL merge frames in temporal patches of 2 (`pixel_values_videos` + `video_grid_thw`);
LLaVA-OneVision pools each frame's features 2x2 (`pixel_values_videos`, exactly data.videoFrames
frames per video: `Collator._video_frames`). Images larger than `max_pixels` are scaled down first
(media.fit_pixels), and Qwen's image processor gets `min_pixels`/`max_pixels` per call
(data.minPixels / data.maxPixels). `Batch.model_inputs()` gives plain HF forward kwargs with the pixels duplicated (a reference path for
tests, and what `generate` needs).

The prompt format is the model's own chat template (template.py: `Template` renders a row into pieces
with exact response/critique masks).

Truncation to `max_length`: the critique is cut from its end first, then the prompt's text (the user's
words, from their start: the end of a question holds the instruction); the template's markers, the
image/video tokens and the response are never cut. A row that still does not fit raises `RowTooLong`
(a DataError naming the row's file:line). `Collator.keep_fitting(pairs)` is the pre-pass that leaves
such rows out and names them; every stage runs it on all its pairs before step 0 (preflight.fitting),
so a too-long row fails the stage in seconds or, with `data.onBadLine: skip`, is dropped and counted.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from mmalign.trainer import media
from mmalign.trainer.data import DataError
from mmalign.trainer.template import Example, Piece, Template

if TYPE_CHECKING:
    from mmalign.trainer.data import PreferencePair
    from mmalign.trainer.media import MediaLoader


_Rows = TypeVar("_Rows", torch.Tensor, list[Any])  # per-row values of a batch: a (R, ...) tensor or a list


class RowTooLong(DataError):
    """A row that does not fit `max_length` even with its prompt text and critique cut (file:line).
    `where`: "row 'id' (file:line)"; `tokens`: its length after the cuts."""

    def __init__(self, message: str, where: str = "", tokens: int = 0) -> None:
        super().__init__(message)
        self.where, self.tokens = where, tokens


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
    pad_token_id: int = 0  # what fills padded positions (prefix.share pads its packed rows with it)

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
            raise ValueError(
                f"split: expected {self.rows} values of a (chosen, rejected) batch, "
                f"got {len(values)} (repeats {self.repeats})"
            )
        return values[: self.pairs], values[self.pairs :]

    def last_token_index(self) -> torch.Tensor:
        """(R,) index of each row's last real token (right padding): where a score head reads."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (self.attention_mask.bool() * positions).amax(dim=1)

    def to(self, device: torch.device | str) -> Batch:
        def move(value: Any) -> Any:
            return value.to(device) if isinstance(value, torch.Tensor) else value

        return dataclasses.replace(
            self,
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            response_mask=move(self.response_mask),
            critique_mask=move(self.critique_mask),
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

@dataclasses.dataclass
class _Row:
    pieces: list[tuple[list[int], str]]  # (token ids, role)
    mm_types: list[int] | None  # per token of the first (vision) piece: 1 image, 2 video (Qwen)
    where: str


def _truncate(row: _Row, max_length: int) -> _Row:
    """Cut the critique from its end, then the prompt text from its start, until the row fits."""
    total = sum(len(ids) for ids, _ in row.pieces)
    for role in ("critique", "prompt_text"):
        for index, (ids, piece_role) in enumerate(row.pieces):
            if total <= max_length or piece_role != role:
                continue
            cut = min(total - max_length, len(ids))
            row.pieces[index] = (ids[: len(ids) - cut] if role == "critique" else ids[cut:], role)
            total -= cut
    if total > max_length:
        fixed = {role: sum(len(ids) for ids, r in row.pieces if r == role) for role in ("vision", "response")}
        raise RowTooLong(
            f"{row.where}: {total} tokens after cutting the prompt text and critique, more than data.maxLength "
            f"{max_length} (image/video and template {fixed['vision']}, response {fixed['response']}; these "
            "are never cut). Raise data.maxLength, lower data.maxPixels or data.videoFrames, or shorten or "
            "remove this row",
            where=row.where,
            tokens=total,
        )
    return row


def _pad(
    rows: list[_Row],
    pad_id: int,
    kind: str,
    repeats: int,
    vision: dict[str, torch.Tensor],
    left: bool = False,
) -> Batch:
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
        input_ids[i, start : start + len(flat)] = torch.tensor(flat, dtype=torch.long)
        attention[i, start : start + len(flat)] = 1
        position = start
        for ids, role in row.pieces:
            if role == "response":
                response[i, position : position + len(ids)] = True
            elif role == "critique":
                critique[i, position : position + len(ids)] = True
            position += len(ids)
        if row.mm_types is not None:
            types[i, start : start + len(row.mm_types)] = torch.tensor(row.mm_types, dtype=torch.long)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention,
        response_mask=response,
        critique_mask=critique if critique.any() else None,
        mm_token_type_ids=types if with_types else None,
        vision=vision,
        repeats=repeats,
        kind=kind,
        pad_token_id=pad_id,
    )


# ------------------------------------------------------------------------------------ public

RowPieces = Callable[[Example, str, int, list[Piece]], list[Piece]]  # (example, side, index, prompt)
VISION_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "image_sizes",
    "batch_num_images",
    "pixel_values_videos",
    "video_grid_thw",
)


class Collator:
    """Pairs -> token batches for one stage, with everything but the pairs bound once.

    `processor`: the model's processor (VLM) or tokenizer (text model); `loader` loads a
    PreferencePair's images/frames (not needed when the caller passes ready `Example`s); every row is
    cut to `max_length` tokens (see the module doc); batches are moved to `device` (None: left on the
    CPU). `chat_template`: spec.model.chatTemplate; `max_pixels`/`min_pixels`: data.maxPixels /
    data.minPixels; `model`: the model's URI for error messages."""

    def __init__(
        self,
        processor: Any,
        loader: MediaLoader | None = None,
        max_length: int = 2048,
        device: torch.device | str | None = None,
        *,
        chat_template: str | None = None,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        model: str = "",
    ) -> None:
        self.processor = processor
        self.template = Template(processor, chat_template, model)  # read once; errors here, at stage start
        self.loader = loader
        self.max_length = max_length
        self.device = device
        self.max_pixels = max_pixels
        self.min_pixels = min_pixels
        # Token ids that end a generated critique (`eos_token_id` for generate).
        self.end_of_turn_ids: list[int] = self.template.end_of_turn_ids

    @classmethod
    def from_spec(
        cls,
        spec: Any,
        processor: Any,
        loader: MediaLoader | None,
        device: torch.device | str | None,
        model: str | None = None,
    ) -> Collator:
        """The stage's collator from the AlignmentJobSpec (data.maxLength, data.maxPixels/minPixels,
        model.chatTemplate); `model`: the URI the processor came from (default spec.model.uri)."""
        return cls(
            processor,
            loader,
            spec.data.max_length,
            device,
            chat_template=spec.model.chat_template,
            max_pixels=spec.data.max_pixels,
            min_pixels=spec.data.min_pixels,
            model=model or spec.model.uri,
        )

    @property
    def tokenizer(self) -> Any:
        return self.template.tokenizer

    def on_cpu(self) -> Collator:
        """This collator leaving its batches on the CPU: a DataLoader worker's (prefetch.py), which must
        never touch the accelerator; the rank moves the batch."""
        cpu = copy.copy(self)
        cpu.device = None
        return cpu

    def examples(self, items: Sequence[Example | PreferencePair]) -> list[Example]:
        """Each pair with its media loaded (in order; the batch's pairs load in parallel threads,
        MediaLoader.load_many); `Example`s pass through as they are."""
        pairs = [item for item in items if not isinstance(item, Example)]
        if pairs and self.loader is None:
            raise ValueError("Collator: preference pairs need a media loader (Collator(processor, loader))")
        loaded = iter(self.loader.load_many(pairs) if self.loader is not None and pairs else [])
        return [
            item if isinstance(item, Example) else Example.from_pair(item, next(loaded)) for item in items
        ]

    def pairs(self, items: Sequence[Example | PreferencePair]) -> Batch:
        """B pairs -> 2B rows (chosen then rejected): prompt + response; response_mask on the response."""
        return self._rows(
            items, lambda example, side, index, prompt: self.template.pieces(example, side, prompt=prompt)
        )

    def reward(
        self,
        items: Sequence[Example | PreferencePair],
        critique: bool = True,
        critiques: Sequence[tuple[str, str]] | None = None,
    ) -> Batch:
        """Reward-model rows: prompt + response [+ critique request + critique]; 2B rows as above.

        `critique`: add the critique (critique_mask marks the critique text + end of turn); `critiques`:
        (chosen, rejected) critique texts per pair to use instead of the annotated ones (the score stage
        passes the generated critiques)."""

        def pieces(example: Example, side: str, index: int, prompt: list[Piece]) -> list[Piece]:
            text = None
            if critique:
                text = (
                    critiques[index][side != "chosen"] if critiques else getattr(example, f"{side}_critique")
                )
            return self.template.pieces(example, side, critique=text, prompt=prompt)

        return self._rows(items, pieces)

    def generation(self, items: Sequence[Example | PreferencePair]) -> Batch:
        """Left-padded critique-generation prompts: prompt + response + critique request (ending in the
        template's generation prompt), 2B rows (chosen then rejected). Feed `batch.model_inputs()` to
        `model.generate`; new tokens start at column `batch.input_ids.shape[1]`."""
        return self._rows(
            items,
            lambda example, side, index, prompt: self.template.pieces(
                example, side, request=True, prompt=prompt
            ),
            left=True,
        )

    def prompts(self, items: Sequence[Example | PreferencePair]) -> Batch:
        """Left-padded response-generation prompts: each pair's prompt alone (ending in the template's
        generation prompt), ONE row per pair (repeats 1: `split` does not apply). The win-rate
        evaluation (evaluation.py) feeds `batch.model_inputs()` to the policy's and the reference's
        `generate`; new tokens start at column `batch.input_ids.shape[1]`."""
        rows, vision = self._encode(self.examples(items), lambda example, side, index, prompt: list(prompt))
        rows = rows[: len(rows) // 2]  # _encode makes a chosen and a rejected row; both are the prompt here
        batch = _pad(rows, self.template.pad_token_id, self.template.kind, 1, vision, left=True)
        return batch if self.device is None else batch.to(self.device)

    def keep_fitting(
        self,
        items: Sequence[PreferencePair],
        critique: bool = False,
    ) -> tuple[list[PreferencePair], list[str]]:
        """The pre-pass before step 0 (preflight.fitting): (pairs whose rows fit max_length, "where: N
        tokens" of the others). `critique`: measure the reward stage's rows (with the annotated
        critiques)."""
        kept, skipped = [], []
        for item in items:
            try:
                self._encode(
                    self.examples([item]),
                    lambda e, s, i, p: self.template.pieces(
                        e, s, critique=getattr(e, f"{s}_critique") if critique else None, prompt=p
                    ),
                )
            except RowTooLong as error:
                skipped.append(f"{error.where}: {error.tokens} tokens")
                continue
            kept.append(item)
        return kept, skipped

    def _bounded(self, images: list[Any]) -> list[Any]:
        return [media.fit_pixels(image, self.max_pixels) for image in images]

    def _encode(
        self, examples: list[Example], pieces: RowPieces
    ) -> tuple[list[_Row], dict[str, torch.Tensor]]:
        """Rows for side in (chosen, rejected), for each example: its prompt pieces (vision placeholders
        expanded once per pair by the processor) + `pieces(...)`, tokenized and cut to max_length."""
        template = self.template
        prompts = [template.prompt_pieces(e) for e in examples]
        vision_ids, types, vision = self._encode_vision(examples, prompts)
        rows = []
        for side in ("chosen", "rejected"):
            for i, (example, prompt) in enumerate(zip(examples, prompts, strict=True)):
                # piece 0 is the prompt's head: the processor tokenized it (vision placeholders expanded)
                tokens = [
                    (vision_ids[i] if index == 0 else template.ids(text), role)
                    for index, (text, role) in enumerate(pieces(example, side, i, prompt))
                ]
                where = example.where or f"pair {i} of the batch"
                rows.append(_truncate(_Row(tokens, types[i] if types else None, where), self.max_length))
        return rows, vision

    def _encode_vision(
        self,
        examples: list[Example],
        prompts: list[list[Piece]],
    ) -> tuple[list[list[int]], list[list[int]] | None, dict[str, torch.Tensor]]:
        """Token ids of each prompt's vision piece (placeholders expanded), Qwen's mm token types, and
        the processor's pixel inputs for the examples."""
        heads = [prompt[0][0] for prompt in prompts]
        template = self.template
        if template.kind == "text" or not any(e.images or e.video for e in examples):
            return [template.ids(h) for h in heads], None, {}
        kwargs: dict[str, Any] = {}
        if any(e.images for e in examples):
            kwargs["images"] = [self._bounded(e.images) for e in examples]
        videos = [e.video for e in examples if e.video]
        if videos:  # the model's own video input; the frames were sampled by the media loader
            kwargs["videos"] = [self._bounded(frames) for frames in self._video_frames(videos)]
            kwargs["videos_kwargs"] = {"do_sample_frames": False}
        if template.kind == "qwen":
            size = self._qwen_size()
            if size:
                kwargs["images_kwargs"] = {"size": size}
            if videos:
                kwargs["videos_kwargs"].update(cap_pixels_per_frame=True, **({"size": size} if size else {}))
        encoded = template.processor(
            text=heads, padding=True, return_tensors="pt", add_special_tokens=False, **kwargs
        )
        keep = encoded["attention_mask"].bool()  # (P, T') padding side does not matter
        ids = [row[mask].tolist() for row, mask in zip(encoded["input_ids"], keep, strict=True)]
        types = None
        if "mm_token_type_ids" in encoded:
            types = [row[mask].tolist() for row, mask in zip(encoded["mm_token_type_ids"], keep, strict=True)]
        return ids, types, {k: encoded[k] for k in VISION_KEYS if k in encoded}

    def _video_frames(self, videos: list[list[Any]]) -> list[list[Any]]:
        """Each video's frames as the processor gets them. LLaVA-OneVision's video input is ONE
        (videos, frames, C, H, W) tensor, so its videos all get exactly data.videoFrames frames (the media
        loader's `video_frames`; without a loader the batch's most): a folder with fewer repeats its
        frames, evenly spread. Its token count is then fixed: frames x ceil(sqrt(N) / 2)^2 + 1 (N: the
        image tokens of one frame, 729 for SigLIP-384/14 -> 196 per frame, 2x2 pooled, + 1 newline).
        Qwen2-VL / Qwen2.5-VL take each video's own frame count (2 frames per temporal patch)."""
        if self.template.kind != "llava":
            return videos
        wanted = self.loader.video_frames if self.loader is not None else max(len(v) for v in videos)
        return [[frames[i] for i in media.spread_indices(len(frames), wanted)] for frames in videos]

    def _qwen_size(self) -> dict[str, int] | None:
        """Qwen2-VL's image processor bounds: {shortest_edge: min_pixels, longest_edge: max_pixels}."""
        if self.max_pixels is None and self.min_pixels is None:
            return None
        current = self.processor.image_processor.size
        default_min = getattr(current, "shortest_edge", None) or getattr(current, "min_pixels", None)
        default_max = getattr(current, "longest_edge", None) or getattr(current, "max_pixels", None)
        return {
            "shortest_edge": int(self.min_pixels or default_min or 56 * 56),
            "longest_edge": int(self.max_pixels or default_max or 28 * 28 * 1280),
        }

    def _rows(
        self, items: Sequence[Example | PreferencePair], pieces: RowPieces, left: bool = False
    ) -> Batch:
        rows, vision = self._encode(self.examples(items), pieces)
        batch = _pad(rows, self.template.pad_token_id, self.template.kind, 2, vision, left=left)
        return batch if self.device is None else batch.to(self.device)
