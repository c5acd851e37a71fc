"""Conversations -> token ids and labels, with the image placeholder expanded.

A sample is a list of messages ``{"role": "user" | "assistant", "content": str}`` (LLaVA's JSON
``{"from": "human" | "gpt", "value": ...}`` is converted by :func:`from_llava`). The text holds
the placeholder ``<image>`` where the image goes; it is one special token of the tokenizer, and
:func:`tokenize_conversation` repeats it ``num_image_tokens`` times (one position per projected
patch feature: the model overwrites exactly those positions, see :func:`qlip.vlm.model.splice`).

Templates. With ``template="auto"`` the tokenizer's own chat template renders the conversation
when it has one (``tokenizer.chat_template``); otherwise (and with ``template="plain"``) the
plain template, LLaVA-1.5's ``vicuna_v1`` without its system line::

    {bos}USER: <image>\nWhat color is the shape? ASSISTANT: red{eos}USER: ... ASSISTANT: ...{eos}

and the generation prompt ends with ``ASSISTANT:``.

Labels. Only the assistant turns are learned: a token's label is its id when the token starts
inside an assistant turn's span (its content and the template's end-of-turn text, e.g. ``{eos}``),
``-100`` elsewhere (template text, the user's prompt, every image position). Spans are found on
the rendered string: the text rendered up to turn ``i`` with the generation prompt is a prefix of
the full text, and the assistant span runs from there to the end of the text rendered through
turn ``i``; the token offsets of a fast tokenizer place each token in it.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from ..errors import DataError

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
TEMPLATES = ("auto", "plain")

Message = Dict[str, str]


def from_llava(conversations: Sequence[Dict[str, str]]) -> List[Message]:
    """LLaVA's ``[{"from": "human", "value": ...}, {"from": "gpt", ...}]`` -> role / content messages."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    out = []
    for turn in conversations:
        who = turn.get("from", turn.get("role"))
        if who not in roles:
            raise DataError(f"conversation turn from {who!r}: expected human/gpt (or user/assistant)")
        out.append({"role": roles[who], "content": str(turn.get("value", turn.get("content", "")))})
    return out


def uses_chat_template(tokenizer, template: str = "auto") -> bool:
    if template not in TEMPLATES:
        raise DataError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    return template == "auto" and bool(getattr(tokenizer, "chat_template", None))


def render_plain(messages: Sequence[Message], add_generation_prompt: bool, bos: str = "", eos: str = "") -> str:
    """The plain template (module docstring)."""
    text = bos
    for m in messages:
        if m["role"] == "user":
            text += f"USER: {m['content']} "
        elif m["role"] == "assistant":
            text += f"ASSISTANT: {m['content']}{eos}"
        else:
            raise DataError(f"the plain template has no role {m['role']!r} (user and assistant only)")
    if add_generation_prompt:
        text += "ASSISTANT:"
    return text


def render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool, template: str = "auto") -> str:
    """The conversation as text, in the tokenizer's chat template or the plain one."""
    if uses_chat_template(tokenizer, template):
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return render_plain(messages, add_generation_prompt, tokenizer.bos_token or "", tokenizer.eos_token or "")


def assistant_spans(tokenizer, messages: Sequence[Message],
                    template: str = "auto") -> Tuple[str, List[Tuple[int, int]]]:
    """The full rendered text and the character spans ``[start, end)`` of its assistant turns."""
    full = render(tokenizer, messages, False, template)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], True, template)
        through = render(tokenizer, messages[:i + 1], False, template)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise DataError("the chat template does not render conversations prefix by prefix; "
                            "use template: plain")
        spans.append((len(before), len(through)))
    return full, spans


def expand_images(ids: List[int], labels: List[int], image_token_id: int, num_image_tokens: int):
    """Repeat each image token ``num_image_tokens`` times (labels ``-100``)."""
    out_ids: List[int] = []
    out_labels: List[int] = []
    for t, y in zip(ids, labels):
        if t == image_token_id:
            out_ids += [image_token_id] * num_image_tokens
            out_labels += [IGNORE_INDEX] * num_image_tokens
        else:
            out_ids.append(t)
            out_labels.append(y)
    return out_ids, out_labels


def tokenize_conversation(tokenizer, messages: Sequence[Message], image_token_id: int, num_image_tokens: int,
                          max_length: int, template: str = "auto", train: bool = True,
                          add_generation_prompt: bool = False) -> Tuple[List[int], List[int]]:
    """``(input_ids, labels)`` of one conversation, image placeholders expanded, at most
    ``max_length`` tokens (cut at the end; cutting an image is an error). ``train=False``:
    every label is ``-100`` (prompts for generation, with ``add_generation_prompt``)."""
    if train:
        text, spans = assistant_spans(tokenizer, messages, template)
    else:
        text, spans = render(tokenizer, messages, add_generation_prompt, template), []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(spans))
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    if spans:
        for j, (s, e) in enumerate(enc["offset_mapping"]):
            if e > s and any(a <= s < b for a, b in spans):
                labels[j] = ids[j]
    ids, labels = expand_images(ids, labels, image_token_id, num_image_tokens)
    if len(ids) > max_length:
        if image_token_id in ids[max_length:]:
            raise DataError(f"a conversation of {len(ids)} tokens cut at max_length {max_length} "
                            f"would cut an image ({num_image_tokens} tokens): raise max_length")
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels
