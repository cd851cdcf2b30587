"""The prompt format is the model's own chat template, and the loss masks follow it exactly.

Template families: ChatML (the tiny built-in models' Qwen2-VL / LLaVA-OneVision / Qwen2 templates), and
Llama-3 and Llama-2 style templates written here for a tiny local tokenizer that has NO pad token.
The mask rule (collate.py): a masked piece is the assistant turn's text plus the template's
end-of-turn (`<|im_end|>`, `<|eot_id|>`, ` </s>`), without the whitespace after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mmalign.trainer import collate, models, tiny
from mmalign.trainer.template import CRITIQUE_REQUEST, ChatTemplateError

LLAMA3 = (  # Llama-3-Instruct's layout: headers, `| trim`, <|eot_id|> ends every turn
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA2 = (  # Llama-2-chat's layout: [INST] ... [/INST], the answer after a space, eos ends the turn
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
    "message['content'] | trim + ' [/INST]' }}{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
QWEN2_VL_HUB = (  # Qwen/Qwen2-VL-7B-Instruct's chat_template, verbatim
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
END_OF_TURN = {"llama3": "<|eot_id|>", "llama2": " </s>"}


def llama_tokenizer(style: str) -> Any:
    """A byte-level BPE tokenizer with Llama's special tokens and no pad token (as Llama's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<s>", "</s>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=special,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(
        ["user assistant The image is red. What colour is it? [INST] [/INST]"] * 4, trainer=trainer
    )
    if style == "llama3":
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
        )
        tokenizer.chat_template = LLAMA3
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
        tokenizer.chat_template = LLAMA2
    tokenizer.name_or_path = f"tiny-{style}"
    return tokenizer


def examples(images: bool) -> list[collate.Example]:
    red = [Image.new("RGB", (32, 32), (200, 20, 20))] if images else []
    return [
        collate.Example(
            "What colour is it?", "The image is red.", "It is blue.", red, "Right colour.", "Wrong."
        ),
        collate.Example("Say more.", "Red, all of it.", "No.", red, "Detailed.", "Too short."),
    ]


def real_tokens(batch: collate.Batch, row: int) -> torch.Tensor:
    return batch.input_ids[row][batch.attention_mask[row].bool()]


def check_rows(collator: collate.Collator, items: list[collate.Example], end: str) -> None:
    """Every row decodes to the template's own rendering; the masks cover exactly the assistant turns."""
    template, tokenizer = collator.template, collator.tokenizer
    batch, reward, generation = collator.pairs(items), collator.reward(items), collator.generation(items)
    sides = [("chosen", i) for i in range(len(items))] + [("rejected", i) for i in range(len(items))]
    for row, (side, i) in enumerate(sides):
        example = items[i]
        user = template._user(example.prompt, example)
        turn = [user, template._text("assistant", getattr(example, side))]
        rendered = template.render(turn, False)
        decoded = tokenizer.decode(real_tokens(batch, row))
        response = tokenizer.decode(batch.input_ids[row][batch.response_mask[row]])
        assert response.strip() == f"{getattr(example, side)}{end}".strip()
        assert response.endswith(end)
        if not (example.images or example.video):  # (with images the placeholders are expanded in the tokens)
            assert decoded == rendered.rstrip()
            assert decoded == template.render([user], True) + response  # generation prompt, then the turn
        # masked tokens are one contiguous block that ends the row (right padding after it)
        masked = batch.response_mask[row].nonzero().flatten()
        assert masked.tolist() == list(range(int(masked[0]), int(masked[-1]) + 1))
        assert int(masked[-1]) + 1 == int(batch.attention_mask[row].sum())
        critique = tokenizer.decode(reward.input_ids[row][reward.critique_mask[row]])  # type: ignore[index]
        assert critique.strip() == f"{getattr(example, f'{side}_critique')}{end}".strip()
        assert tokenizer.decode(reward.input_ids[row][reward.response_mask[row]]) == response
        asked = template.render([*turn, template._text("user", CRITIQUE_REQUEST)], True)
        if not (example.images or example.video):
            assert tokenizer.decode(real_tokens(generation, row)) == asked  # ends in the generation prompt
        assert not (reward.response_mask & reward.critique_mask).any()  # type: ignore[operator]


@pytest.mark.parametrize("name", ["qwen2-vl", "llava-onevision", "text"])
def test_chatml_templates_of_the_checkpoint_give_exact_masks(name: str) -> None:
    processor = tiny.build_processor(name)
    collator = collate.Collator(processor)
    check_rows(collator, examples(images=name != "text"), "<|im_end|>")
    assert collator.tokenizer.convert_tokens_to_ids("<|im_end|>") in collator.end_of_turn_ids
    if name == "qwen2-vl":  # the checkpoint's own template: Qwen2-VL's default system prompt is there
        text = collator.tokenizer.decode(collator.pairs(examples(True)).input_ids[0])
        assert text.startswith(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        )


def test_qwen2_vl_hub_template_with_images_and_video() -> None:
    collator = collate.Collator(tiny.build_processor("qwen2-vl"), chat_template=QWEN2_VL_HUB)
    frames = [Image.new("RGB", (32, 32), (20 * i, 0, 0)) for i in range(2)]
    items = [
        *examples(images=True),
        collate.Example("What happens?", "It turns red.", "Nothing.", video=frames),
    ]
    check_rows(collator, items, "<|im_end|>")
    head = collator.template.prompt_pieces(items[0])[0][0]
    assert head.endswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>")


@pytest.mark.parametrize("style", ["llama3", "llama2"])
def test_llama_templates_and_a_tokenizer_without_a_pad_token(style: str) -> None:
    tokenizer = llama_tokenizer(style)
    assert tokenizer.pad_token_id is None
    collator = collate.Collator(tokenizer)
    check_rows(collator, examples(images=False), END_OF_TURN[style])
    assert collator.template.pad_token_id == tokenizer.eos_token_id  # eos pads; attention_mask hides it
    batch = collator.pairs(examples(images=False))
    assert (batch.input_ids[~batch.attention_mask.bool()] == tokenizer.eos_token_id).all()
    assert collator.end_of_turn_ids == [tokenizer.eos_token_id]
    bos = tokenizer.bos_token_id
    assert (batch.input_ids[:, 0] == bos).all() and int(
        (batch.input_ids == bos).sum()
    ) == batch.rows  # one bos


def test_the_llama3_response_mask_is_exactly_the_answer_and_eot() -> None:
    tokenizer = llama_tokenizer("llama3")
    batch = collate.Collator(tokenizer).pairs([collate.Example("What colour is it?", "Red.", "Blue.")])
    ids = batch.input_ids[0][batch.attention_mask[0].bool()]
    mask = batch.response_mask[0][: len(ids)]
    assert tokenizer.decode(ids[~mask]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "What colour is it?<|eot_id|><|start_header_id|>assistant"
        "<|end_header_id|>\n\n"
    )
    assert tokenizer.decode(ids[mask]) == "Red.<|eot_id|>"


def test_a_model_without_a_chat_template_is_refused_unless_the_spec_gives_one(tmp_path: Path) -> None:
    tokenizer = llama_tokenizer("llama3")
    tokenizer.chat_template = None
    with pytest.raises(
        ChatTemplateError,
        match=r"s3://models/my-llama: .*no chat template.*"
        r"spec\.model\.chatTemplate",
    ):
        collate.Collator(tokenizer, model="s3://models/my-llama")
    collator = collate.Collator(tokenizer, chat_template=LLAMA3, model="s3://models/my-llama")
    check_rows(collator, examples(images=False), "<|eot_id|>")
    tokenizer.save_pretrained(tmp_path)  # the override travels with an exported model
    assert "<|start_header_id|>" in (tmp_path / "chat_template.jinja").read_text()


def test_a_processor_override_is_what_the_exported_folder_carries(tmp_path: Path) -> None:
    model, processor = tiny.build_tiny("qwen2-vl")
    override = tiny.QWEN_VL_TEMPLATE.replace("You are a helpful assistant.", "Judge images.")
    collator = collate.Collator(processor, chat_template=override)
    assert "Judge images." in collator.tokenizer.decode(collator.pairs(examples(True)).input_ids[0])
    models.save_model(model, processor, tmp_path / "policy")
    _, reloaded = models.load_model(str(tmp_path / "policy"))
    assert "Judge images." in reloaded.chat_template


def test_templates_that_rewrite_earlier_turns_are_refused() -> None:
    tokenizer = llama_tokenizer("llama3")
    # renders the prompt turn differently once an answer follows (like templates that drop reasoning)
    rewriting = (
        "{% for m in messages %}{{ m['role'] }}{% if loop.last %}!{% endif %}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="differently"):
        collate.Collator(tokenizer, chat_template=rewriting)
    # writes more than whitespace before the answer that its generation prompt does not
    no_generation_prompt = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="generation prompt"):
        collate.Collator(tokenizer, chat_template=no_generation_prompt)
    with pytest.raises(ChatTemplateError, match="failed to render"):
        collate.Collator(tokenizer, chat_template="{{ raise_exception('roles must alternate') }}")


def test_llava_onevision_template_whitespace_difference_is_accepted() -> None:
    """LLaVA-OneVision's own template writes `assistant \\n` in a turn but `assistant\\n` as the
    generation prompt: the row keeps the generation prompt (what generation sees) and the turn's text."""
    collator = collate.Collator(tiny.build_processor("llava-onevision"))
    batch = collator.pairs(examples(True))
    text = collator.tokenizer.decode(real_tokens(batch, 0))
    assert text.endswith("<|im_start|>assistant\nThe image is red.<|im_end|>")
