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

import dataclasses
import time
from pathlib import Path
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
FOLDER_VERSION = "v1"  # bump when a saved folder's content changes: builtin.model_folder's cache name has it

# The checkpoints' own chat templates (tokenizer_config.json / chat_template.jinja of the Hub models),
# trimmed to what the tiny models need: ChatML turns; Qwen2-VL adds its default system prompt and wraps
# each image in vision markers; LLaVA-OneVision puts `<image>` first in the turn, then a newline
# and the text (its assistant text in `{% generation %}`, for assistant-token masks).
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_TEMPLATE = (  # llava-hf/llava-onevision-qwen2-7b-ov-hf's, verbatim (string content added)
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% if message['content'] is string %}{{ '\\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXT_TEMPLATE = (  # Qwen2's ChatML, text only
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_TEMPLATES = {"qwen2-vl": QWEN_VL_TEMPLATE, "qwen2.5-vl": QWEN_VL_TEMPLATE, "llava-onevision": LLAVA_TEMPLATE,
                  "text": TEXT_TEMPLATE}

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
    tokenizer.chat_template = CHAT_TEMPLATES.get(architecture, TEXT_TEMPLATE)
    return tokenizer


@dataclasses.dataclass(frozen=True)
class Size:
    """Widths of one preset. Vision towers follow each architecture's own layout."""

    hidden: int  # text decoder width
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    mrope_section: tuple[int, int, int]  # Qwen 3-D RoPE split of head_dim / 2
    vocab: int | None  # None: the tokenizer's ~600; a real size pads the embedding (memory realism)
    vision_width: int
    vision_layers: int
    vision_heads: int
    patch: int  # vision patch side in pixels
    image: int  # processors resize images to image x image pixels
    window: int  # Qwen2.5-VL attention window in pixels


SIZES = {
    # ~10 ms forward+backward on one CPU core: the unit tests' models.
    "tiny": Size(64, 128, 2, 4, 2, (2, 3, 3), None, 32, 1, 2, 8, IMAGE_SIZE, 16),
    # ~0.5B parameters with Qwen2-0.5B's decoder shape and a 12-layer vision tower: GPU smoke runs
    # (builtin://random-*-0.5b). Random weights: learns nothing real, measures time and memory.
    "0.5b": Size(896, 4864, 24, 14, 2, (8, 12, 12), 151936, 1024, 12, 16, 14, 448, 112),
}


def _text_config(tokenizer: Any, size: Size, **extra: Any) -> dict[str, Any]:
    return dict(
        vocab_size=size.vocab or len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=32768,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,  # upstream's 151643 is out of range for a tiny vocabulary
        tie_word_embeddings=size.vocab is not None,  # Qwen2-0.5B ties them; tiny models keep both

        **extra,
    )


def _qwen_config(architecture: str, tokenizer: Any, size: Size) -> Any:
    ids = tokenizer.convert_tokens_to_ids
    vision: dict[str, Any] = dict(depth=size.vision_layers, embed_dim=size.vision_width, hidden_size=size.hidden,
                                  num_heads=size.vision_heads, patch_size=size.patch, spatial_merge_size=2,
                                  temporal_patch_size=2, in_channels=3)
    common = dict(image_token_id=ids(QWEN_IMAGE), video_token_id=ids(QWEN_VIDEO),
                  vision_start_token_id=ids(VISION_START), vision_end_token_id=ids(VISION_END))
    # Qwen's multimodal RoPE splits each head's dims into (temporal, height, width) sections.
    text = _text_config(tokenizer, size, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": list(size.mrope_section)})
    if architecture == "qwen2-vl":
        from transformers import Qwen2VLConfig

        vision["mlp_ratio"] = 2
        return Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    from transformers import Qwen2_5_VLConfig

    # Qwen2.5-VL: windowed attention over 2x2 merged patches; block 0 full attention.
    vision.pop("embed_dim")
    vision.update(hidden_size=size.vision_width, intermediate_size=2 * size.vision_width,
                  out_hidden_size=size.hidden, window_size=size.window, fullatt_block_indexes=[0])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)


def _llava_config(tokenizer: Any, size: Size) -> Any:
    from transformers import LlavaOnevisionConfig

    ids = tokenizer.convert_tokens_to_ids
    vision = dict(model_type="siglip_vision_model", hidden_size=size.vision_width,
                  intermediate_size=2 * size.vision_width, num_hidden_layers=size.vision_layers,
                  num_attention_heads=size.vision_heads, image_size=size.image, patch_size=size.patch)
    text = dict(model_type="qwen2", **_text_config(tokenizer, size))
    return LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_index=ids(LLAVA_IMAGE),
        video_token_index=ids(LLAVA_VIDEO), image_grid_pinpoints=[[size.image, size.image]],
        vision_aspect_ratio="anyres_max_1", vision_feature_select_strategy="full",
    )


def build_processor(architecture: str, tokenizer: Any | None = None, size: str = "tiny") -> Any:
    """The HF processor matching `architecture` (the tokenizer itself for `text`)."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(architecture)
    preset = SIZES[size]
    side = preset.image
    if architecture == "text":
        return tokenizer
    if architecture in ("qwen2-vl", "qwen2.5-vl"):
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor
        from transformers import Qwen2VLProcessor as Processor

        if architecture == "qwen2.5-vl":
            from transformers import Qwen2_5_VLProcessor as Processor  # type: ignore[assignment]
        sizes: dict[str, Any] = dict(size={"shortest_edge": side * side, "longest_edge": side * side},
                                     patch_size=preset.patch, merge_size=2, temporal_patch_size=2)
        return Processor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer,
                         video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=QWEN_VL_TEMPLATE)
    if architecture == "llava-onevision":
        from transformers import (
            LlavaOnevisionImageProcessor,
            LlavaOnevisionProcessor,
            LlavaOnevisionVideoProcessor,
        )

        images = LlavaOnevisionImageProcessor(size={"height": side, "width": side},
                                              image_grid_pinpoints=[[side, side]])
        videos = LlavaOnevisionVideoProcessor(size={"height": side, "width": side})
        return LlavaOnevisionProcessor(
            image_processor=images, video_processor=videos, tokenizer=tokenizer,
            num_image_tokens=(side // preset.patch) ** 2,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1",
            chat_template=LLAVA_TEMPLATE,
        )
    raise ValueError(f"unknown tiny architecture {architecture!r}: use one of {', '.join(TINY_ARCHITECTURES)}")


def build_config(architecture: str, tokenizer: Any, size: str = "tiny") -> Any:
    preset = SIZES[size]
    if architecture in ("qwen2-vl", "qwen2.5-vl"):
        return _qwen_config(architecture, tokenizer, preset)
    if architecture == "llava-onevision":
        return _llava_config(tokenizer, preset)
    if architecture == "text":
        from transformers import Qwen2Config

        return Qwen2Config(**_text_config(tokenizer, preset))
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
    """Draw every parameter from a private generator: identical on every rank and every run, whatever
    the global RNG did before. Normalisation layers start as identity (weight 1, bias 0), other biases
    at 0, everything else N(0, 0.02²) (HF's initializer_range)."""
    generator = torch.Generator().manual_seed(seed)
    owner = {id(p): type(m).__name__.lower() for m in model.modules() for p in m.parameters(recurse=False)}
    for name, parameter in sorted(model.named_parameters()):
        if "norm" in owner[id(parameter)]:
            parameter.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            parameter.zero_()
        else:
            parameter.normal_(0.0, 0.02, generator=generator)
    # Buffers (RoPE inverse frequencies) are computed from the config, not drawn: nothing to seed.


def build_tiny(architecture: str, seed: int = 0, size: str = "tiny") -> tuple[torch.nn.Module, Any]:
    """`(model, processor)` for a random-init `architecture` of preset `size`, float32, eval mode."""
    from transformers.initialization import no_init_weights

    tokenizer = build_tokenizer(architecture)
    processor = build_processor(architecture, tokenizer, size)
    config = build_config(architecture, tokenizer, size)
    with no_init_weights():  # _seeded_init draws every parameter anyway: skip HF's and torch's init
        model = _model_class(architecture)._from_config(config, dtype=torch.float32)
    model.tie_weights()  # no_init_weights also skips the tying that `tie_word_embeddings` asks for
    _seeded_init(model, seed)
    model.eval()
    return model, processor


def save_tiny(architecture: str, folder: str | Path, seed: int = 0, size: str = "tiny",
              max_shard_size: str | int = "5GB") -> Path:
    """`build_tiny` written as a Hugging Face checkpoint folder, exactly what `save_pretrained` gives for
    a Hub model: config.json (+ generation_config.json), model.safetensors (or shards + index when larger
    than `max_shard_size`), the tokenizer/processor files and the chat template."""
    model, processor = build_tiny(architecture, seed=seed, size=size)
    path = Path(folder)
    # Under torch.distributed, save_pretrained writes the weights and config on global rank 0 only
    # (PreTrainedModel.should_save_on_this_rank); every node's first rank builds its own cache folder
    # (builtin.model_folder), so this private folder is written whatever the rank.
    setattr(model, "should_save_on_this_rank", lambda is_main_process: True)  # noqa: B010 (nn.Module typing)
    model.save_pretrained(path, max_shard_size=max_shard_size)  # type: ignore[operator]
    processor.save_pretrained(path)
    return path


def _time_forward_backward(architecture: str, repeats: int = 10) -> float:
    """Milliseconds per forward+backward of 2 sequences (chosen+rejected of one pair, one image)."""
    from PIL import Image

    from mmalign.trainer import collate, template

    model, processor = build_tiny(architecture)
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    pair = template.Example(prompt="What colour is the image?", chosen="The image is red.",
                            rejected="The image is blue.", images=[image] if architecture != "text" else [])
    batch = collate.Collator(processor).pairs([pair])
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
