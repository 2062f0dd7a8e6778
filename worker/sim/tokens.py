"""The simulator's toy tokenizer and its deterministic "model" output.

Rules (every part of the simulator and its tests relies on them):

* A token is a whitespace-separated word: ``tokenize(text) == text.split()``.
* A chat prompt renders each message as ``<|role|> content`` (content parts of type ``text`` are joined by
  spaces; other parts are dropped) and joins the messages with single spaces, then appends the generation
  marker ``<|assistant|>``.  So ``[user "hi there"]`` renders to ``"<|user|> hi there <|assistant|>"``:
  3 + 1 = 4 prompt tokens.  A longer conversation is a textual extension of the shorter one: round 1's
  prompt followed by round 1's answer is a prefix of round 2's prompt, which is what makes prefix caching
  across rounds work (the answer's tokens are cached when a request finishes).
* A completion prompt is the prompt text itself; a list of token ids is rendered as the ids' decimal strings.
* The output is ``max_tokens`` words from ``VOCAB``: byte i of the SHAKE-128 digest of the rendered prompt
  picks word i (``byte % len(VOCAB)``), so the same prompt always yields the same answer, on every worker.
  Text = words joined by single spaces; in a stream token i is sent as ``word`` (i == 0) or ``" " + word``,
  so the concatenated deltas equal the non-streaming text and re-tokenize to exactly ``max_tokens`` tokens.

Vocabulary words are plain lowercase ASCII, so they never need JSON escaping (chunk templates rely on it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

_WORDS = """the a of to and in is it that for on with as was at by be this from or an are not have but
    they one all we can her his there been if more when will would who so no out up into than them
    time could about other some what only new also then these its two first way may over any after
    model token cache block prefix batch queue fleet proxy worker route stream chunk latency"""
VOCAB: tuple[str, ...] = tuple(_WORDS.split())
VOCAB_BYTES: tuple[bytes, ...] = tuple(w.encode() for w in VOCAB)
VOCAB_INDEX: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}

ASSISTANT_MARKER = "<|assistant|>"


class PromptError(ValueError):
    """The request's messages or prompt cannot be rendered (maps to HTTP 400)."""


def tokenize(text: str) -> list[str]:
    """Split text into tokens (whitespace-separated words)."""
    return text.split()


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return " ".join(parts)
    raise PromptError("message content must be a string or a list of content parts")


def render_chat(messages: Any) -> str:
    """Render OpenAI chat messages (or a bare string, as LMDeploy accepts) into the prompt text."""
    if isinstance(messages, str):
        if not messages:
            raise PromptError("messages must not be empty")
        return f"<|user|> {messages} {ASSISTANT_MARKER}"
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list")
    rendered: list[str] = []
    for msg in messages:
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise PromptError("each message must be an object with a string 'role'")
        text = _content_text(msg.get("content"))
        rendered.append(f"<|{msg['role']}|> {text}" if text else f"<|{msg['role']}|>")
    rendered.append(ASSISTANT_MARKER)
    return " ".join(rendered)


def render_completion(prompt: Any) -> str:
    """Render a /v1/completions prompt: a string, a one-element list of strings, or a list of token ids."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise PromptError("prompt must not be empty")
        return prompt
    if isinstance(prompt, list) and prompt:
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return render_completion(prompt[0])
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return " ".join(str(t) for t in prompt)
        raise PromptError("batched prompts are not supported by the simulator; send one prompt per request")
    raise PromptError("prompt must be a non-empty string or list of token ids")


def output_words(prompt_text: str, n: int) -> list[int]:
    """The deterministic answer to `prompt_text`: `n` indexes into VOCAB (a few microseconds per request)."""
    if n <= 0:
        return []
    k = len(VOCAB)
    return [b % k for b in hashlib.shake_128(prompt_text.encode()).digest(n)]


def output_text(words: Sequence[int]) -> str:
    return " ".join(VOCAB[i] for i in words)
