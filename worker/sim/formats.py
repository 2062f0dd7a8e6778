"""Wire formats of the generative endpoints: OpenAI chat/completions, LMDeploy /generate, /v1/responses.

Streams are Server-Sent Events, one ``data: {json}\\n\\n`` event per token, built from byte templates made
once per request (vocabulary words never need escaping), so a token costs a bytes join, not a JSON dump.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from .tokens import VOCAB, VOCAB_BYTES, output_text

DONE = b"data: [DONE]\n\n"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def usage_dict(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def error_body(status: int, message: str, err_type: str | None = None, param: str | None = None) -> bytes:
    """OpenAI's ``{"error": {...}}`` plus LMDeploy's flat fields (``object: "error"``, message, type, code)."""
    if err_type is None:
        err_type = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
    err = {"message": message, "type": err_type, "param": param, "code": status}
    return _dumps({"object": "error", **err, "error": err})


class Format:
    """How one request's answer is spelled; subclasses fill in the templates."""

    id_prefix = "x-"
    media_type = "text/event-stream"

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = self.id_prefix + secrets.token_hex(12)
        self.created = int(time.time())

    def tokens(self, words: list[int], start: int, end: int) -> list[bytes]:
        """SSE events for tokens [start, end)."""
        raise NotImplementedError

    def tail(self, finish_reason: str, usage: dict[str, Any]) -> list[bytes]:
        """SSE events after the last token."""
        raise NotImplementedError

    def full(self, words: list[int], finish_reason: str, usage: dict[str, Any]) -> bytes:
        """The non-streaming body for the generated `words`."""
        raise NotImplementedError


class _OpenAIFormat(Format):
    object_name = "chat.completion.chunk"

    def _head(self) -> bytes:
        return (
            b'data: {"id":"'
            + self.id.encode()
            + b'","object":"'
            + self.object_name.encode()
            + b'","created":'
            + str(self.created).encode()
            + b',"model":'
            + _dumps(self.model)
        )

    def _end(self) -> bytes:
        return b',"usage":null}\n\n' if self.include_usage else b"}\n\n"

    def tail(self, finish_reason: str, usage: dict[str, Any]) -> list[bytes]:
        head = self._head()
        out = [head + b',"choices":[' + self._final_choice(finish_reason) + b"]" + self._end()]
        if self.include_usage:
            out.append(head + b',"choices":[],"usage":' + _dumps(usage) + b"}\n\n")
        out.append(DONE)
        return out

    def _final_choice(self, finish_reason: str) -> bytes:
        raise NotImplementedError


class ChatFormat(_OpenAIFormat):
    id_prefix = "chatcmpl-"
    object_name = "chat.completion.chunk"

    def __init__(self, model: str, include_usage: bool = False) -> None:
        super().__init__(model, include_usage)
        head = self._head() + b',"choices":[{"index":0,"delta":{'
        self._first = head + b'"role":"assistant","content":"'
        self._next = head + b'"content":" '
        self._suffix = b'"},"logprobs":null,"finish_reason":null}]' + self._end()

    def tokens(self, words: list[int], start: int, end: int) -> list[bytes]:
        nxt, suf, vb = self._next, self._suffix, VOCAB_BYTES
        out = [nxt + vb[words[i]] + suf for i in range(max(start, 1), end)]
        if start == 0 and end > 0:
            out.insert(0, self._first + vb[words[0]] + suf)
        return out

    def _final_choice(self, finish_reason: str) -> bytes:
        return b'{"index":0,"delta":{},"logprobs":null,"finish_reason":' + _dumps(finish_reason) + b"}"

    def full(self, words: list[int], finish_reason: str, usage: dict[str, Any]) -> bytes:
        text = output_text(words)
        return _dumps(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
                "usage": usage,
            }
        )


class CompletionFormat(_OpenAIFormat):
    id_prefix = "cmpl-"
    object_name = "text_completion"

    def __init__(self, model: str, include_usage: bool = False) -> None:
        super().__init__(model, include_usage)
        head = self._head() + b',"choices":[{"index":0,"text":"'
        self._first = head
        self._next = head + b" "
        self._suffix = b'","logprobs":null,"finish_reason":null}]' + self._end()

    tokens = ChatFormat.tokens

    def _final_choice(self, finish_reason: str) -> bytes:
        return b'{"index":0,"text":"","logprobs":null,"finish_reason":' + _dumps(finish_reason) + b"}"

    def full(self, words: list[int], finish_reason: str, usage: dict[str, Any]) -> bytes:
        text = output_text(words)
        return _dumps(
            {
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
                "usage": usage,
            }
        )


class GenerateFormat(Format):
    """LMDeploy's /generate: ``{"text", "output_ids", "meta_info"}``; the last token's event finishes."""

    def __init__(self, model: str, prompt_tokens: int) -> None:
        super().__init__(model)
        self.prompt_tokens = prompt_tokens
        self.max_tokens = 0

    def _meta(self, completion: int, finish_reason: str | None) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "finish_reason": {"type": finish_reason} if finish_reason else None,
            "output_token_logprobs": None,
        }

    def tokens(self, words: list[int], start: int, end: int) -> list[bytes]:
        out = []
        for i in range(start, end):
            fin = "length" if i + 1 == self.max_tokens else None
            ev = {
                "text": VOCAB[words[i]] if i == 0 else " " + VOCAB[words[i]],
                "output_ids": [words[i]],
                "meta_info": self._meta(i + 1, fin),
            }
            out.append(b"data: " + _dumps(ev) + b"\n\n")
        return out

    def tail(self, finish_reason: str, usage: dict[str, Any]) -> list[bytes]:
        if finish_reason == "length":
            return [DONE]
        ev = {"text": "", "output_ids": [], "meta_info": self._meta(usage["completion_tokens"], finish_reason)}
        return [b"data: " + _dumps(ev) + b"\n\n", DONE]

    def full(self, words: list[int], finish_reason: str, usage: dict[str, Any]) -> bytes:
        return _dumps(
            {
                "text": output_text(words),
                "output_ids": list(words),
                "meta_info": self._meta(usage["completion_tokens"], finish_reason),
            }
        )


class ResponsesFormat(Format):
    """A minimal OpenAI Responses API: ``response.created``, ``response.output_text.delta`` per token,
    ``response.completed`` (typed SSE events), or one ``response`` object."""

    id_prefix = "resp_"

    def _response(self, status: str, text: str | None, usage: dict[str, Any] | None) -> dict[str, Any]:
        output = (
            []
            if text is None
            else [
                {
                    "type": "message",
                    "id": "msg_" + self.id[5:],
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ]
        )
        resp: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": output,
            "usage": None,
        }
        if usage is not None:
            resp["usage"] = {
                "input_tokens": usage["prompt_tokens"],
                "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"],
                "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
                "output_tokens_details": {"reasoning_tokens": 0},
            }
        return resp

    @staticmethod
    def _event(kind: str, data: dict[str, Any]) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + _dumps({"type": kind, **data}) + b"\n\n"

    def tokens(self, words: list[int], start: int, end: int) -> list[bytes]:
        out = []
        if start == 0 and end > 0:
            out.append(self._event("response.created", {"response": self._response("in_progress", None, None)}))
        for i in range(start, end):
            delta = VOCAB[words[i]] if i == 0 else " " + VOCAB[words[i]]
            out.append(
                self._event(
                    "response.output_text.delta",
                    {"item_id": "msg_" + self.id[5:], "output_index": 0, "content_index": 0, "delta": delta},
                )
            )
        return out

    def tail(self, finish_reason: str, usage: dict[str, Any]) -> list[bytes]:
        return [self._event("response.completed", {"response": self._response("completed", None, usage)})]

    def full(self, words: list[int], finish_reason: str, usage: dict[str, Any]) -> bytes:
        status = "completed" if finish_reason == "length" else "incomplete"
        return _dumps(self._response(status, output_text(words), usage))
