"""Tiny random-init models of every supported architecture, with a tokenizer built locally.

No machine here reaches a model hub, so tests, examples and a user's cluster smoke test use these:
`build_tiny("qwen2-vl", seed=0)` returns `(model, processor)` in a few hundred milliseconds. The same
name and seed give bit-identical weights on every rank (a private torch.Generator-seeded init, no
dependence on the global RNG state).

Architectures (the `TINY_ARCHITECTURES` keys): `qwen2-vl`, `qwen2.5-vl`, `llava-onevision`, `text`.

The tokenizer is a byte-level BPE trained with `tokenizers` on a few KB of built-in text, so any input
string tokenizes (bytes fall back to single-byte tokens) and the vocabulary stays ~600 entries. Special
tokens cover padding, end of text, the chat markers and each architecture's vision placeholders.

Measured pitfalls (transformers 5.23): the HF processors need torchvision (present in our image);
Qwen2-VL's forward wants `mm_token_type_ids` (collate.py adds it); a tiny vocabulary must not carry the
upstream `bos_token_id` (151643 > vocab) so we set `bos_token_id=None`.

Run `python -m mmalign.trainer.tiny` to print each model's size and a forward+backward timing.
"""

from __future__ import annotations

import time
from typing import Any

import torch

# Special tokens, in id order after the byte alphabet merges. Qwen's names are kept so that a reader
# who knows Qwen2-VL recognises them; LLaVA-OneVision uses `<image>`/`<video>`.
PAD, EOS = "<|pad|>", "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
QWEN_IMAGE, QWEN_VIDEO = "<|image_pad|>", "<|video_pad|>"
LLAVA_IMAGE, LLAVA_VIDEO = "<image>", "<video>"
SPECIAL_TOKENS = [PAD, EOS, IM_START, IM_END, VISION_START, VISION_END, QWEN_IMAGE, QWEN_VIDEO,
                  LLAVA_IMAGE, LLAVA_VIDEO]

TINY_ARCHITECTURES = ("qwen2-vl", "qwen2.5-vl", "llava-onevision", "text")
IMAGE_SIZE = 32  # every tiny processor resizes images to 32x32: 4x4 patches of 8 px

# A few KB of text the BPE learns its merges from: the chat scaffolding, the synthetic data's words
# and ordinary English, so that real prompts do not explode into single bytes.
_CORPUS = """
user assistant system The image shows a colour. What colour is the image? What shape is in the image?
The image is red. The image is green. The image is blue. The image is yellow. The image is purple.
The image is orange. The image is white. The image is black. The image is cyan. The image is pink.
A circle, a square, a triangle, a star. The answer is correct and the analysis is reasonable.
The answer is incorrect, the image does not match the question. The description is too simple.
The response names the right colour. The response names a wrong colour. It is accurate and helpful.
Please answer the question about the picture. Describe the video. Where is the person standing?
According to the question shown in the image, please first perform reasoning, then select the answer.
Choices: A B C D. Answer: The person is standing outside near a building entrance with a bag.
I am sorry, but I cannot help with that request because it could cause harm to people.
This is a safe and detailed answer that explains the reasoning step by step with numbers 0 1 2 3 4 5
6 7 8 9 10 12.5 and punctuation , . ; : ! ? ( ) [ ] " ' - + = / \\ % $ # @ & * _ < > { } | ~ ^ `
"""


def build_tokenizer(architecture: str = "qwen2-vl") -> Any:
    """A `PreTrainedTokenizerFast`: byte-level BPE (~600 tokens) with our special tokens; deterministic.

    The vocabulary is the same for every architecture; only the `image_token`/`video_token` attributes
    the HF processors read differ (Qwen's `<|image_pad|>`, LLaVA's `<image>`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD,
        eos_token=EOS,
        extra_special_tokens=(
            {"image_token": LLAVA_IMAGE, "video_token": LLAVA_VIDEO} if architecture == "llava-onevision"
            else {"image_token": QWEN_IMAGE, "video_token": QWEN_VIDEO}
        ),
    )
    tokenizer.padding_side = "right"
    return tokenizer


def _text_config(tokenizer: Any, **extra: Any) -> dict[str, Any]:
    """A 2-layer, 64-wide Qwen2 decoder: small enough for ~10 ms forward+backward on one CPU core."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,  # upstream's 151643 is out of range for a tiny vocabulary
        tie_word_embeddings=False,
        **extra,
    )


def _qwen_config(architecture: str, tokenizer: Any) -> Any:
    ids = tokenizer.convert_tokens_to_ids
    vision: dict[str, Any] = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    common = dict(image_token_id=ids(QWEN_IMAGE), video_token_id=ids(QWEN_VIDEO),
                  vision_start_token_id=ids(VISION_START), vision_end_token_id=ids(VISION_END))
    # Qwen's multimodal RoPE splits each head's 16 dims into (temporal, height, width) sections.
    text = _text_config(tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 3, 3]})
    if architecture == "qwen2-vl":
        from transformers import Qwen2VLConfig

        vision["mlp_ratio"] = 2
        return Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    from transformers import Qwen2_5_VLConfig

    # Qwen2.5-VL: windowed attention; window 16 px = 2x2 patches, block 0 full attention.
    vision.pop("embed_dim")
    vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=16,
                  fullatt_block_indexes=[0])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)


def _llava_config(tokenizer: Any) -> Any:
    from transformers import LlavaOnevisionConfig

    ids = tokenizer.convert_tokens_to_ids
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8)
    text = dict(model_type="qwen2", **_text_config(tokenizer))
    return LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_index=ids(LLAVA_IMAGE),
        video_token_index=ids(LLAVA_VIDEO), image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]],
        vision_aspect_ratio="anyres_max_1", vision_feature_select_strategy="full",
    )


def build_processor(architecture: str, tokenizer: Any | None = None) -> Any:
    """The HF processor matching `architecture` (the tokenizer itself for `text`)."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(architecture)
    if architecture == "text":
        return tokenizer
    if architecture in ("qwen2-vl", "qwen2.5-vl"):
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor
        from transformers import Qwen2VLProcessor as Processor

        if architecture == "qwen2.5-vl":
            from transformers import Qwen2_5_VLProcessor as Processor  # type: ignore[assignment,no-redef]
        pixels = IMAGE_SIZE * IMAGE_SIZE
        sizes: dict[str, Any] = dict(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=8, merge_size=2,
                     temporal_patch_size=2)
        return Processor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer,
                         video_processor=Qwen2VLVideoProcessor(**sizes))
    if architecture == "llava-onevision":
        from transformers import (
            LlavaOnevisionImageProcessor,
            LlavaOnevisionProcessor,
            LlavaOnevisionVideoProcessor,
        )

        images = LlavaOnevisionImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                              image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]])
        videos = LlavaOnevisionVideoProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        return LlavaOnevisionProcessor(
            image_processor=images, video_processor=videos, tokenizer=tokenizer,
            num_image_tokens=(IMAGE_SIZE // 8) ** 2,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1",
        )
    raise ValueError(f"unknown tiny architecture {architecture!r}: use one of {', '.join(TINY_ARCHITECTURES)}")


def build_config(architecture: str, tokenizer: Any) -> Any:
    if architecture in ("qwen2-vl", "qwen2.5-vl"):
        return _qwen_config(architecture, tokenizer)
    if architecture == "llava-onevision":
        return _llava_config(tokenizer)
    if architecture == "text":
        from transformers import Qwen2Config

        return Qwen2Config(**_text_config(tokenizer))
    raise ValueError(f"unknown tiny architecture {architecture!r}: use one of {', '.join(TINY_ARCHITECTURES)}")


def _model_class(architecture: str) -> Any:
    import transformers

    return {
        "qwen2-vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2.5-vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "llava-onevision": transformers.LlavaOnevisionForConditionalGeneration,
        "text": transformers.Qwen2ForCausalLM,
    }[architecture]


@torch.no_grad()
def _seeded_init(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from a private generator: identical on every rank and every run,
    whatever the global RNG did before. Norm weights stay 1 (as HF initialises them)."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in sorted(model.named_parameters()):
        if "norm" in name and parameter.dim() == 1:
            parameter.fill_(1.0)
        elif name.endswith("bias"):
            parameter.zero_()
        else:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    # Buffers (RoPE inverse frequencies) are computed from the config, not drawn: nothing to seed.


def build_tiny(architecture: str, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """`(model, processor)` for a tiny random-init `architecture`, in float32, train mode off."""
    tokenizer = build_tokenizer(architecture)
    processor = build_processor(architecture, tokenizer)
    config = build_config(architecture, tokenizer)
    model = _model_class(architecture)._from_config(config, dtype=torch.float32)
    _seeded_init(model, seed)
    model.eval()
    return model, processor


def _time_forward_backward(architecture: str, repeats: int = 10) -> float:
    """Milliseconds per forward+backward of 2 sequences (chosen+rejected of one pair, one image)."""
    from PIL import Image

    from mmalign.trainer import collate

    model, processor = build_tiny(architecture)
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    pair = collate.Example(prompt="What colour is the image?", chosen="The image is red.",
                           rejected="The image is blue.", images=[image] if architecture != "text" else [])
    batch = collate.collate_pairs([pair], processor)
    model.train()
    timings = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        out = model(**batch.model_inputs())
        out.logits.float().mean().backward()
        timings.append(time.perf_counter() - start)
    return 1000 * sorted(timings[2:])[len(timings[2:]) // 2]


if __name__ == "__main__":
    torch.set_num_threads(1)
    for arch in TINY_ARCHITECTURES:
        m, _ = build_tiny(arch)
        n = sum(p.numel() for p in m.parameters())
        print(f"{arch:16s} {n / 1e3:7.1f}k params  fwd+bwd {_time_forward_backward(arch):6.1f} ms")
