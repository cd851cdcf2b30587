"""The prompt format: the model's OWN chat template, and the pieces of a row it gives (collate.py
tokenizes and pads them into batches).

The prompt format is the model's OWN chat template (`Template`: the spec override `model.chatTemplate`,
else the processor's, else the tokenizer's; no template at all is an error naming the model). Each
piece of a row is the difference between two renderings of the conversation, so masks are exact:
  prompt   = render([user], add_generation_prompt=True)          (images/video placeholders expanded)
  response = render([user, assistant]) - prompt                  (response_mask = 1)
  request  = render([..., user: critique request], gen. prompt) - the above
  critique = render([..., assistant: critique]) - the above      (critique_mask = 1)
A template whose rendering of a shorter conversation is not a prefix of the longer one (one that
rewrites earlier turns) is refused with a clear error. THE MASK RULE: a masked piece is everything the
template writes for the assistant turn after its generation prompt — the text and the template's
end-of-turn (`<|im_end|>` for ChatML, ` </s>` for Llama-2, `<|eot_id|>` for Llama-3) — without the
whitespace after it (that goes to the next piece, or is dropped at the end of a row: generation stops
at the end-of-turn token). Pieces are tokenized separately, as generation sees them (the response
continues the prompt's tokens). A tokenizer without a pad token pads with eos (else unk); the padded
positions are masked out by `attention_mask`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from mmalign.api.exit_codes import ExitCode

CRITIQUE_REQUEST = "Critique the answer above."
_TEXT_MARK = "\x00mmalign-prompt-text\x00"  # stands for the user's words when locating them in a rendering


class ChatTemplateError(ValueError):
    """The model's chat template is missing or cannot give exact masks: a configuration error."""

    exit_code = ExitCode.CONFIG_ERROR


@dataclasses.dataclass
class Example:
    """What collation needs from one preference pair (media already loaded)."""

    prompt: str
    chosen: str
    rejected: str
    images: list[Any] = dataclasses.field(default_factory=list)  # PIL images
    chosen_critique: str = ""
    rejected_critique: str = ""
    video: list[Any] = dataclasses.field(default_factory=list)  # the sampled frames of a video (PIL)
    where: str = ""  # the row, for errors: "row 'id' (file:line)"

    @classmethod
    def from_pair(cls, pair: Any, media_items: list[Any]) -> Example:
        """`media_items`: what MediaLoader.load gave: the images, or a video's frames."""
        video = pair.media_kind == "video"
        return cls(
            prompt=pair.prompt,
            chosen=pair.chosen,
            rejected=pair.rejected,
            images=[] if video else media_items,
            video=media_items if video else [],
            chosen_critique=pair.chosen_critique,
            rejected_critique=pair.rejected_critique,
            where=f"row {pair.id!r} ({pair.uid})",
        )


# (text, role); role: vision (prompt head) | prompt | prompt_text | response | request | critique
Piece = tuple[str, str]
_MASKED = ("response", "critique")


class Template:
    """The model's chat template and vision placeholders, read once from its processor.

    `chat_template`: the spec's override (model.chatTemplate); it is also set on the processor and its
    tokenizer so that an exported model carries the template it was trained with. `model`: the model's
    name for error messages."""

    def __init__(self, processor: Any, chat_template: str | None = None, model: str = "") -> None:
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.processor = processor
        self.model = model or getattr(self.tokenizer, "name_or_path", "") or type(processor).__name__
        name = type(processor).__name__.lower()
        if self.tokenizer is processor:
            self.kind = "text"  # a text model ignores the pairs' images
        elif "qwen2vl" in name or "qwen2_5_vl" in name:
            self.kind = "qwen"
        elif "llavaonevision" in name:
            self.kind = "llava"
        else:
            raise ValueError(
                f"unsupported processor {type(processor).__name__}: mmalign supports Qwen2-VL, "
                "Qwen2.5-VL, LLaVA-OneVision and text-only causal LMs"
            )
        if chat_template:
            self.tokenizer.chat_template = chat_template
            if processor is not self.tokenizer:
                processor.chat_template = chat_template
        own = getattr(processor, "chat_template", None) if processor is not self.tokenizer else None
        template = chat_template or own or getattr(self.tokenizer, "chat_template", None)
        if not template or not isinstance(template, str):
            raise ChatTemplateError(
                f"{self.model}: the model has no chat template (no chat_template.jinja, and none in its "
                "processor or tokenizer config), so the prompt format it was fine-tuned on is unknown; set "
                "spec.model.chatTemplate to its Jinja chat template, or use a checkpoint that ships one"
            )
        self.chat_template = template
        self.pad_token_id = _pad_token_id(self.tokenizer, self.model)
        # Probe once: the template renders, keeps its turns, and says which tokens end a turn.
        probe = self.pieces(Example("Question?", "Answer.", "Other."), "chosen")
        tail = probe[-1][0][len("Answer.") :] if probe[-1][0].startswith("Answer.") else probe[-1][0]
        special = set(self.tokenizer.all_special_ids) | set(
            getattr(self.tokenizer, "added_tokens_decoder", {})
        )
        ids = {t for t in self.ids(tail) if t in special}
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        self.end_of_turn_ids: list[int] = sorted(ids)  # `eos_token_id` for generate

    # -- rendering

    def _user(self, text: str, example: Example) -> dict[str, Any]:
        if self.kind == "text":
            return {"role": "user", "content": text}
        # Qwen2-VL / Qwen2.5-VL and LLaVA-OneVision alike: a video is ONE video placeholder (the model's
        # own video input; collate.py hands the processor the frames as `videos=`)
        vision = [{"type": "image"} for _ in example.images] + [{"type": "video"}] * bool(example.video)
        return {"role": "user", "content": [*vision, {"type": "text", "text": text}]}

    def _text(self, role: str, text: str) -> dict[str, Any]:
        return {"role": role, "content": text if self.kind == "text" else [{"type": "text", "text": text}]}

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        except Exception as error:  # jinja2 TemplateError, or the template's own raise_exception
            raise ChatTemplateError(
                f"{self.model}: its chat template failed to render a conversation "
                f"({type(error).__name__}: {error}); fix spec.model.chatTemplate"
            ) from None
        return str(text)

    def _mismatch(self, shorter: str, longer: str, what: str) -> ChatTemplateError:
        at = len(os.path.commonprefix([shorter, longer]))
        return ChatTemplateError(
            f"{self.model}: its chat template renders the conversation before {what} differently from the "
            f"start of the conversation with it (first difference at character {at}: {shorter[at : at + 40]!r} "
            f"vs {longer[at : at + 40]!r}), so the {what} tokens cannot be masked exactly; set "
            "spec.model.chatTemplate to a template that leaves earlier turns unchanged"
        )

    def _after(self, shorter: str, longer: str, what: str) -> str:
        """`longer` minus its prefix `shorter`; a template that rewrites earlier turns is refused."""
        if not longer.startswith(shorter):
            raise self._mismatch(shorter, longer, what)
        return longer[len(shorter) :]

    def _assistant_turn(self, prompt: str, full: str, text: str, what: str) -> str:
        """What the template writes for an assistant turn after `prompt` (rendered with its generation
        prompt) in `full` (the conversation with the turn): the text and the end-of-turn.

        Some checkpoints' templates write the turn's start slightly differently from their generation
        prompt (LLaVA-OneVision: `<|im_start|>assistant \n` in a turn, `<|im_start|>assistant\n` as
        the generation prompt). A difference in whitespace only is accepted: the row keeps the
        generation prompt (what the model sees when it generates) and the turn from its text on. Any
        other difference, or text before the turn's words, is refused."""
        body = text.strip()
        if full.startswith(prompt):
            span = full[len(prompt) :]
            at = span.find(body) if body else len(span) - len(span.lstrip())
            if at < 0:
                raise ChatTemplateError(
                    f"{self.model}: its chat template does not write the {what} text as "
                    f"given ({body[:40]!r}); fix spec.model.chatTemplate"
                )
            if span[:at].strip():
                raise ChatTemplateError(
                    f"{self.model}: its chat template writes {span[:at].strip()[:40]!r} before the {what} that "
                    "its generation prompt (add_generation_prompt) does not, so generation and training would "
                    "see different prompts; set spec.model.chatTemplate to one with a generation prompt"
                )
            return span
        common = len(os.path.commonprefix([prompt, full]))
        rest = full[common:]
        at = rest.find(body) if body else len(rest) - len(rest.lstrip())
        if at < 0 or prompt[common:].strip() or rest[:at].strip():
            raise self._mismatch(prompt, full, f"the {what}")
        return rest[at:]

    def prompt_pieces(self, example: Example) -> list[Piece]:
        """The prompt: template head (with the vision placeholders), the user's words, template tail."""
        images = self.kind != "text" and bool(example.images or example.video)
        rendered = self.render([self._user(example.prompt, example)], True)
        marked = self.render([self._user(_TEXT_MARK, example)], True)
        if marked.count(_TEXT_MARK) == 1:
            head, tail = marked.split(_TEXT_MARK)
            if (
                rendered.startswith(head)
                and rendered.endswith(tail)
                and len(rendered) >= len(head) + len(tail)
            ):
                return [
                    (head, "vision" if images else "prompt"),
                    (rendered[len(head) : len(rendered) - len(tail)], "prompt_text"),
                    (tail, "prompt"),
                ]
        return [(rendered, "vision" if images else "prompt")]  # the user's words cannot be located: uncut

    def pieces(
        self,
        example: Example,
        side: str,
        request: bool = False,
        critique: str | None = None,
        prompt: list[Piece] | None = None,
    ) -> list[Piece]:
        """One row's pieces: prompt, response [, critique request [, critique]] (see the module doc)."""
        response = getattr(example, side)
        messages = [self._user(example.prompt, example)]
        rendered = self.render(messages, True)
        out = list(prompt) if prompt is not None else self.prompt_pieces(example)
        messages.append(self._text("assistant", response))
        full = self.render(messages, False)
        out.append((self._assistant_turn(rendered, full, response, "response"), "response"))
        if request or critique is not None:
            messages.append(self._text("user", CRITIQUE_REQUEST))
            asked = self.render(messages, True)
            out.append((self._after(full, asked, "the critique request"), "request"))
            if critique is not None:
                messages.append(self._text("assistant", critique))
                judged = self.render(messages, False)
                out.append((self._assistant_turn(asked, judged, critique, "critique"), "critique"))
        return _move_trailing_space(out)

    def prompt_and_response(self, example: Example, side: str) -> tuple[str, str]:
        """The prompt and the masked response text of one row, as strings (benchmarks, debugging)."""
        pieces = self.pieces(example, side)
        return "".join(text for text, _ in pieces[:-1]), pieces[-1][0]

    def ids(self, text: str) -> list[int]:
        # The template writes bos/eos itself: no special tokens of the tokenizer's own on top.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _pad_token_id(tokenizer: Any, model: str) -> int:
    """The pad token, else eos, else unk (set on the tokenizer, so generate and exports agree)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    for fallback in (tokenizer.eos_token, tokenizer.unk_token):
        if fallback is not None:
            tokenizer.pad_token = fallback  # padded positions have attention_mask 0: never attended
            pad_id: int = tokenizer.convert_tokens_to_ids(fallback)
            return pad_id
    raise ChatTemplateError(f"{model}: the tokenizer has no pad, eos or unk token to pad batches with")


def _move_trailing_space(pieces: list[Piece]) -> list[Piece]:
    """Masked pieces end at the end-of-turn: the whitespace after it goes to the next piece (or is
    dropped at the end of a row)."""
    out: list[Piece] = []
    carry = ""
    for text, role in pieces:
        text = carry + text
        carry = ""
        if role in _MASKED:
            stripped = text.rstrip()
            carry, text = text[len(stripped) :], stripped
        out.append((text, role))
    return out
