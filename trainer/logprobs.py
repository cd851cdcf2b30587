"""Per-sequence response log-probabilities without full-vocabulary float32 logits.

    hidden = logprobs.forward_hidden(model, batch)                    # (R, T, H), vision once per pair
    out = logprobs.sequence_logprobs(model, hidden, batch)            # out.logps (R,), out.tokens (R,)
    out = logprobs.policy_logprobs(model, batch, prefix_sharing=True) # the same, one prompt pass per pair
    out = logprobs.policy_logprobs(model, batch, prefix_sharing=True, packing=True)  # + pairs packed in rows

With `prefix_sharing` (prefix.py, the DPO stage's default: stages.dpo.prefixSharing) a pair's chosen
and rejected rows are packed into ONE sequence after their shared prompt (block attention mask, each
token at its plain row's position); the results are the plain path's to float tolerance. With
`packing` (stages.dpo.packing) several pairs' sequences share a row, no padding between them.

The naive way (TRL, the MM-RLHF reference loop) computes `model(...).logits.float()`: R·T·V floats
(2 rows x 2048 tokens x 152k vocab = 2.5 GB in float32 per pair) and keeps them for backward. Here the
LM head runs on chunks of `chunk_size` positions; each chunk's logits but the last live only inside a
`torch.utils.checkpoint` region, so backward recomputes them chunk by chunk: peak extra memory is
R·chunk_size·V floats (the last chunk's are kept: backward begins with them, see token_logprobs). Only positions whose NEXT token is a response (or critique) token are computed.

Measured on one H100 (torch 2.11, transformers 5.23, bf16, no gradient checkpointing, 2026-11-26), 4 pairs
with 448x448 images, 10.8k response tokens, vocabulary 151,936, forward+backward of the policy:
  builtin://random-qwen2-vl-0.5b        8 x 1668 tokens: this path 288 ms, 22.2 GiB peak;
                                         TRL-style (pixels per row, full fp32 logits) 295 ms, 51.5 GiB
  builtin://random-llava-onevision-0.5b 8 x 3491 tokens: this path 536 ms, 46.2 GiB;
                                         TRL-style out of memory on the 79 GiB card
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from mmalign.trainer.collate import Batch
from mmalign.trainer.prefix import Layout, share


def _backbone(model: Any) -> Any:
    """The decoder stack without the LM head (HF: `model.model` for every supported class)."""
    return model.model


_QWEN_INPUTS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


@dataclasses.dataclass
class TowerHandoff:
    """The frozen vision tower's output (before the trained projector) of the batch one pass just ran,
    handed to the next pass over the SAME batch: DPO's reference model runs only its own projector
    (Qwen2-VL / Qwen2.5-VL's merger) instead of a second tower forward. Valid only when both models'
    towers hold the same frozen weights (stages.dpo: `tower_handoff`). One-shot: `take` empties it, so
    a pass never reuses an output across steps (a benchmark re-running one batch would skip its tower)."""

    key: Any = None  # the batch's pixel tensor the states were computed from (identity, kept alive)
    states: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # kind -> (patches, width)

    def keep(self, batch: Batch, states: dict[str, torch.Tensor]) -> None:
        self.key, self.states = _pixels(batch), {kind: s.detach() for kind, s in states.items()}

    def take(self, batch: Batch) -> dict[str, torch.Tensor] | None:
        found = self.states if self.key is not None and self.key is _pixels(batch) else None
        self.key, self.states = None, {}
        return found


def _pixels(batch: Batch) -> Any:
    return batch.vision.get("pixel_values", batch.vision.get("pixel_values_videos"))


def _qwen_projected(visual: Any, states: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What Qwen2-VL / Qwen2.5-VL's tower forward returns after its blocks: the merger over the blocks'
    (patches, width) output, Qwen2.5-VL's window order undone, split per image/video (get_*_features)."""
    merged = visual.merger(states)  # (patches / merge², H)
    if getattr(visual, "fullatt_block_indexes", None) is not None:  # Qwen2.5-VL: blocks ran in window order
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size,
                                                  visual.patch_size)
        merged = merged[torch.argsort(window_index.to(merged.device))]
    sizes = (grid.prod(-1) // visual.spatial_merge_size**2).tolist()
    return tuple(torch.split(merged, sizes))


def encode_vision(model: Any, batch: Batch, repeats: int | None = None,
                  handoff: TowerHandoff | None = None) -> dict[str, Any] | None:
    """Run the vision encoder ONCE per pair; repeat its features for every row of the pair (`repeats`
    times, default batch.repeats; 1 for a prefix-shared batch, whose image tokens appear once).
    `handoff` (Qwen families): take the frozen tower's output of this batch from it when another pass
    left it there (then only the projector runs here), else keep this pass's output in it."""
    if not batch.vision:
        return None
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    backbone = _backbone(model)
    outputs: dict[str, Any] = {}  # "image" / "video" -> the encoder's output for the P pairs
    if batch.kind == "qwen":
        reused = handoff.take(batch) if handoff is not None else None
        for kind, (pixels, grid) in _QWEN_INPUTS.items():
            if pixels not in batch.vision:
                continue
            if reused is not None:
                pooled = _qwen_projected(backbone.visual, reused[kind], batch.vision[grid])
                outputs[kind] = BaseModelOutputWithPooling(pooler_output=pooled)  # type: ignore[arg-type]
            else:  # the model's own image / video input (collate.py)
                features = backbone.get_image_features if kind == "image" else backbone.get_video_features
                outputs[kind] = features(batch.vision[pixels], batch.vision[grid], return_dict=True)
        if handoff is not None and reused is None:
            handoff.keep(batch, {kind: out.last_hidden_state for kind, out in outputs.items()})
    else:
        config = model.config
        if "pixel_values" in batch.vision:
            outputs["image"] = backbone.get_image_features(
                batch.vision["pixel_values"], batch.vision["image_sizes"],
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
                vision_aspect_ratio=config.vision_aspect_ratio,
                batch_num_images=batch.vision.get("batch_num_images"),
            )
        if "pixel_values_videos" in batch.vision:  # LLaVA-OneVision's video input (collate.py)
            outputs["video"] = backbone.get_video_features(
                batch.vision["pixel_values_videos"],  # (V, frames, C, H, W)
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
                return_dict=True,
            )
    # One (tokens, H) tensor per image/video, pair order; HF types pooler_output as a Tensor, the VLMs'
    # get_*_features return a per-item tuple here, except LLaVA-OneVision's videos: one (V, tokens, H)
    # tensor, which its forward flattens, so it stays a tensor.
    times = batch.repeats if repeats is None else repeats
    encoded: dict[str, Any] = {}
    for kind, out in outputs.items():
        pooled = out.pooler_output
        if isinstance(pooled, torch.Tensor):
            encoded[kind] = BaseModelOutputWithPooling(pooler_output=torch.cat([pooled] * times))
        else:
            encoded[kind] = BaseModelOutputWithPooling(pooler_output=tuple(list(pooled) * times))  # type: ignore[arg-type]
    return encoded


def row_positions(model: Any, batch: Batch) -> torch.Tensor:
    """Each real token's position in its plain row: (R, T) 1-D positions (real tokens counted, so
    left and right padding give the same), or Qwen2-VL / Qwen2.5-VL's (3, R, T) mRoPE positions from
    the model's own `get_rope_index` (what its forward computes when given no positions)."""
    grids = {key: torch.cat([batch.vision[key]] * batch.repeats)
             for key in ("image_grid_thw", "video_grid_thw") if key in batch.vision}
    if batch.kind == "qwen" and grids and batch.mm_token_type_ids is not None:
        positions: torch.Tensor = _backbone(model).get_rope_index(
            batch.input_ids, mm_token_type_ids=batch.mm_token_type_ids, attention_mask=batch.attention_mask,
            **grids)[0]
        return positions
    real = batch.attention_mask.long()
    return (real.cumsum(dim=1) - 1).clamp(min=0)  # (R, T)


def _attention_mask(model: Any, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """The packed batch's (N, 1, S, S) mask as the model's attention kernel takes it: boolean for
    SDPA, additive for eager. transformers hands a 4-D mask to the kernel as it is."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    allowed = layout.allowed()
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    raise ValueError(
        f"prefix sharing needs an attention implementation that takes a 4-D mask (sdpa or eager), the "
        f"model uses {implementation!r}; set stages.dpo.prefixSharing: false"
    )


def vision_token_ids(model: Any) -> frozenset[int]:
    """The model's image/video placeholder token ids (prefix.share keeps them in the shared prompt)."""
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    found = (getattr(model.config, name, None) for name in names)
    return frozenset(int(value) for value in found if value is not None)


def forward_hidden(model: Any, batch: Batch, layout: Layout | None = None,
                   handoff: TowerHandoff | None = None) -> torch.Tensor:
    """(R, T, H) last hidden states of every row; the vision tower runs once per pair (or not at all:
    `handoff`, encode_vision). With a prefix-sharing `layout`: (N, S, H), the layout's rows (one per
    pair, or packed pairs: prefix.py)."""
    if layout is not None:
        return _forward_shared(model, batch, layout, handoff)
    kwargs: dict[str, Any] = batch.text_inputs()
    features = encode_vision(model, batch, handoff=handoff)
    if features is not None:
        kwargs["mm_encoder_outputs"] = features
        if batch.kind == "qwen":  # 3-D RoPE positions need the grids, repeated per row
            for key in ("image_grid_thw", "video_grid_thw"):
                if key in batch.vision:
                    kwargs[key] = torch.cat([batch.vision[key]] * batch.repeats)
    kwargs["use_cache"] = False
    return _backbone(model)(**kwargs).last_hidden_state


def _forward_shared(model: Any, batch: Batch, layout: Layout, handoff: TowerHandoff | None) -> torch.Tensor:
    """(N, S, H): one forward of the layout's rows; positions gathered from the plain rows' (so they
    restart per pair in a packed row). Vision features go to the image tokens in row-major order,
    which prefix.share keeps in pair order."""
    backbone = _backbone(model)
    positions = layout.gather(row_positions(model, batch))  # (N, S) or (3, N, S)
    mask = _attention_mask(model, layout, backbone.get_input_embeddings().weight.dtype)  # (N, 1, S, S)
    kwargs: dict[str, Any] = {"input_ids": layout.input_ids, "position_ids": positions, "attention_mask": mask,
                              "use_cache": False}
    features = encode_vision(model, batch, repeats=1, handoff=handoff)
    if features is not None:
        if layout.packed_order != list(range(layout.pairs)):
            features = _in_packed_order(model, batch, features, layout.packed_order)
        kwargs["mm_encoder_outputs"] = features  # Qwen: the positions given, so no grids or token types needed
    return backbone(**kwargs).last_hidden_state


_PLACEHOLDERS = {"image": ("image_token_id", "image_token_index"), "video": ("video_token_id", "video_token_index")}


def _in_packed_order(model: Any, batch: Batch, features: dict[str, Any], order: list[int]) -> dict[str, Any]:
    """encode_vision's per-pair features (pair order) rearranged into `order`, the pairs' row-major
    order in a packed layout: the model scatters them over the image/video tokens in that order. An
    item (one image or video: (tokens, H)) belongs to the pair whose placeholder tokens it fills; a
    pair's placeholders all lie in its shared prompt, so its chosen row counts them."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    chosen = batch.input_ids[: batch.pairs]  # (B, T)
    out = {}
    for kind, encoded in features.items():
        token = next(getattr(model.config, name) for name in _PLACEHOLDERS[kind]
                     if getattr(model.config, name, None) is not None)
        counts = (chosen == token).sum(dim=1).tolist()  # (B,) placeholder tokens per pair
        pooled = encoded.pooler_output  # a tuple of (tokens, H), or one (items, tokens, H) tensor
        items = list(pooled) if isinstance(pooled, (tuple, list)) else list(pooled.unbind(0))
        per_pair: list[list[torch.Tensor]] = []
        position = 0
        for count in counts:
            taken: list[torch.Tensor] = []
            while count > 0 and position < len(items):
                taken.append(items[position])
                count -= int(items[position].shape[0])
                position += 1
            if count != 0:
                raise ValueError(f"packing: the {kind} features do not match the pairs' {kind} tokens; set "
                                 "stages.dpo.packing: false and report this")
            per_pair.append(taken)
        moved = [item for pair in order for item in per_pair[pair]]
        rebuilt: Any = tuple(moved) if isinstance(pooled, (tuple, list)) else torch.stack(moved)
        out[kind] = BaseModelOutputWithPooling(pooler_output=rebuilt)
    return out


@dataclasses.dataclass
class SequenceLogprobs:
    logps: torch.Tensor  # (R,) summed log p(token) over masked tokens, float32
    tokens: torch.Tensor  # (R,) number of masked tokens


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for one chunk: (N, H) hidden, (N,) targets -> (N,) float32.

    The head is CALLED as a module (not `F.linear(hidden, head.weight)`): under ZeRO-3 its weight is
    partitioned and only gathered by the module's forward hooks, once per chunk."""
    logits = head(hidden).float()  # (N, V): the only full-vocabulary tensor, one chunk at a time
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logprobs(model: Any, hidden: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                   chunk_size: int = 1024, layout: Layout | None = None) -> torch.Tensor:
    """(R, T) log p(input_ids[:, t] | < t) at positions where `mask` is set, 0 elsewhere.

    Position t's token is predicted from hidden[:, t-1]; position 0 is never scored. Only the N masked
    positions reach the LM head, in chunks of `chunk_size` positions (across rows). With a `layout`,
    `hidden` is the packed (N, S, H) and row r's column t-1 is read where the layout put it."""
    head = model.get_output_embeddings()
    target_mask = mask.clone()
    target_mask[:, 0] = False
    rows, cols = target_mask.nonzero(as_tuple=True)  # (N,), (N,) only the scored positions
    if layout is None:
        states = hidden[rows, cols - 1]  # (N, H)
    else:
        states = hidden[layout.pair_of_row(rows), layout.slot[rows, cols - 1]]  # (N, H)
    targets = input_ids[rows, cols]  # (N,)
    pieces = []
    starts = range(0, targets.shape[0], chunk_size)
    for start in starts:
        piece = slice(start, start + chunk_size)
        # Recompute the (chunk, V) logits in backward instead of keeping them; except the last chunk's:
        # backward starts with it, while every activation is still alive, so its recomputation would
        # allocate the same logits at the same moment: keeping them saves one LM-head pass at no peak.
        if torch.is_grad_enabled() and states.requires_grad and start != starts[-1]:
            pieces.append(checkpoint(_chunk_logps, head, states[piece], targets[piece], use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, states[piece], targets[piece]))
    out = torch.zeros(target_mask.shape, dtype=torch.float32, device=hidden.device)
    if pieces:
        out = out.index_put((rows, cols), torch.cat(pieces))
    return out


def sequence_logprobs(model: Any, hidden: torch.Tensor, batch: Batch, mask: torch.Tensor | None = None,
                      chunk_size: int = 1024, layout: Layout | None = None) -> SequenceLogprobs:
    """Summed log-probs of each row's response tokens (or of `mask`'s tokens, e.g. the critique);
    `layout`: `hidden` is forward_hidden's packed output for it."""
    mask = batch.response_mask if mask is None else mask
    per_token = token_logprobs(model, hidden, batch.input_ids, mask, chunk_size, layout)  # (R, T)
    return SequenceLogprobs(logps=per_token.sum(dim=1), tokens=mask[:, 1:].sum(dim=1))


def naive_sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(R,) the reference computation from full (R, T, V) logits; for tests and debugging only."""
    logps = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # (R, T-1, V)
    picked = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (R, T-1)
    return (picked * mask[:, 1:]).sum(dim=1)


def policy_logprobs(model: Any, batch: Batch, chunk_size: int = 1024, prefix_sharing: bool = False,
                    packing: bool = False, handoff: TowerHandoff | None = None) -> SequenceLogprobs:
    """forward_hidden + sequence_logprobs: what the DPO stage calls for policy and reference.
    `prefix_sharing`: one prompt pass per (chosen, rejected) pair (prefix.py); `packing`: and several
    pairs per row (needs prefix_sharing); `handoff`: the frozen tower's output shared with the other
    pass over the same batch (TowerHandoff)."""
    if packing and not prefix_sharing:
        raise ValueError("packing needs prefix sharing (stages.dpo.packing needs stages.dpo.prefixSharing)")
    layout = share(batch, vision_token_ids(model), pack=packing) if prefix_sharing else None
    return sequence_logprobs(model, forward_hidden(model, batch, layout, handoff), batch, chunk_size=chunk_size,
                             layout=layout)
