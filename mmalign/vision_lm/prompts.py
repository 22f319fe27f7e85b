"""Prompts in the model's own chat template, with its image tokens; a plain fallback for processors without one.

A prompt arrives as a conversation (TRL's conversational format: ``{"role", "content"}`` messages whose content
parts include ``{"type": "image"}``) or as a string (TRL's standard format):

- a conversation is rendered with ``processor.apply_chat_template(messages, add_generation_prompt=True)``;
- a string that already contains the model's image token is taken as it is (the user formatted it);
- any other string becomes one user turn ``[image parts..., text]`` rendered the same way.

Plain fallback (the processor has no ``chat_template``): each message becomes ``"<role>: <text>"`` on its own line,
image parts become the model's image token, and the prompt ends with ``"assistant:"``; a plain string prompt is
``"<image token> ... <prompt>"`` (one token per image, space-separated). Responses are plain text: a conversational
response is the text of its assistant message(s).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

__all__ = ["image_token_of", "format_prompt", "response_text", "has_chat_template"]


def image_token_of(processor: Any, model_config: Any = None) -> str | None:
    """The string the processor expands into image placeholders (``processor.image_token``, or the token of the
    config's ``image_token_id``)."""
    token = getattr(processor, "image_token", None)
    if isinstance(token, str) and token:
        return token
    tok = getattr(processor, "tokenizer", processor)
    if model_config is not None:
        for key in ("image_token_id", "image_token_index"):
            tid = getattr(model_config, key, None)
            if tid is not None:
                return tok.convert_ids_to_tokens(int(tid))
    return None


def has_chat_template(processor: Any) -> bool:
    tok = getattr(processor, "tokenizer", None)
    return bool(getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None))


def _parts(content: Any) -> list[Any]:
    if content is None:
        return []
    return list(content) if isinstance(content, (list, tuple)) else [content]


def _part_text(part: Any) -> str | None:
    """The text of a content part, or None for a media part."""
    if isinstance(part, Mapping):
        kind = part.get("type")
        if kind == "text" or (kind is None and "text" in part):
            return str(part.get("text") or "")
        return None
    return "" if part is None else str(part)


def response_text(value: str | Sequence[Mapping[str, Any]]) -> str:
    """A response as plain text: a string as it is; a conversation's assistant text (all its text parts)."""
    if isinstance(value, str):
        return value
    texts = []
    for message in value:
        if message.get("role", "assistant") != "assistant":
            continue
        texts += [t for t in (_part_text(p) for p in _parts(message.get("content"))) if t]
    return " ".join(t.strip() for t in texts)


def _normalise(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages with list content (templates of several families iterate over ``content`` parts)."""
    out = []
    for m in messages:
        parts = []
        for p in _parts(m.get("content")):
            parts.append(dict(p) if isinstance(p, Mapping) else {"type": "text", "text": str(p)})
        out.append({"role": m["role"], "content": parts})
    return out


def _plain(messages: Sequence[Mapping[str, Any]], image_token: str | None) -> str:
    lines = []
    for m in messages:
        words = []
        for p in _parts(m.get("content")):
            text = _part_text(p)
            if text is None:
                if isinstance(p, Mapping) and p.get("type") == "image":
                    if image_token is None:
                        raise ValueError("the processor names no image token for the plain prompt fallback")
                    words.append(image_token)
            elif text.strip():
                words.append(text.strip())
        lines.append(f"{m['role']}: {' '.join(words)}")
    return "\n".join(lines + ["assistant:"])


def format_prompt(processor: Any, prompt: str | Sequence[Mapping[str, Any]], n_images: int,
                  image_token: str | None = None) -> str:
    """The prompt string the processor takes (see the module docstring); ``n_images`` images go with it."""
    if image_token is None:
        image_token = image_token_of(processor)
    if isinstance(prompt, str):
        if (image_token and image_token in prompt) or (n_images == 0 and not has_chat_template(processor)):
            return prompt
        if not has_chat_template(processor):
            return " ".join([image_token or ""] * n_images + [prompt]).strip()
        prompt = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}]
    messages = _normalise(prompt)
    if has_chat_template(processor):
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return _plain(messages, image_token)
