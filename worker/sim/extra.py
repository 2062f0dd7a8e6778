"""LMDeploy's other api_server routes, as the sim answers them (issue 11): /v1/encode (tokenize),
/pooling (a deterministic vector per input, like a reward/embedding model's pooled output) and
/v1/messages (Anthropic's Messages API, non-streaming; a stream is refused with a 400 naming it)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from aiohttp import web

from .serving import SESSION_LEN, embed
from .state import SimState, admit, error_response
from .tokens import PromptError, output_text, output_words, render_chat, tokenize


async def _admit_json(request: web.Request) -> tuple[SimState, dict[str, Any]] | web.StreamResponse:
    """The front of each route here: `admit` (API key, then the active fault), then a JSON object body.
    Returns the state and the body, or the response to send instead."""
    admitted = await admit(request)
    if isinstance(admitted, web.StreamResponse):
        return admitted
    try:
        body = json.loads(await request.read())
    except ValueError as e:
        return error_response(400, f"Invalid JSON body: {e}")
    if not isinstance(body, dict):
        return error_response(400, "The request body must be a JSON object")
    return admitted[0], body


def _texts(inp: Any) -> list[str] | None:
    texts = [inp] if isinstance(inp, str) else inp
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return None
    return texts


def _ids(text: str) -> list[int]:
    return [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=3).digest(), "big") for w in tokenize(text)]


async def encode(request: web.Request) -> web.StreamResponse:
    """LMDeploy's EncodeRequest {input, do_preprocess, add_bos} -> EncodeResponse {input_ids, length}."""
    front = await _admit_json(request)
    if isinstance(front, web.StreamResponse):
        return front
    _, body = front
    texts = _texts(body.get("input"))
    if texts is None:
        return error_response(400, "The 'input' field must be a string or a non-empty list of strings")
    ids = [([1] if body.get("add_bos", True) else []) + _ids(t) for t in texts]
    if isinstance(body.get("input"), str):
        return web.json_response({"input_ids": ids[0], "length": len(ids[0])})
    return web.json_response({"input_ids": ids, "length": [len(i) for i in ids]})


async def pooling(request: web.Request) -> web.StreamResponse:
    front = await _admit_json(request)
    if isinstance(front, web.StreamResponse):
        return front
    st, body = front
    model = body.get("model")
    if model is not None and model != st.config.model:
        return error_response(404, f"The model {model!r} does not exist.")
    texts = _texts(body.get("input"))
    if texts is None:
        return error_response(400, "The 'input' field must be a string or a non-empty list of strings")
    n = sum(len(tokenize(t)) for t in texts)
    data = [{"index": i, "object": "pooling", "data": embed(t)} for i, t in enumerate(texts)]
    return web.json_response({"object": "list", "model": st.config.model, "data": data,
                              "usage": {"prompt_tokens": n, "total_tokens": n}})


async def messages(request: web.Request) -> web.StreamResponse:
    front = await _admit_json(request)
    if isinstance(front, web.StreamResponse):
        return front
    st, body = front
    if body.get("model") != st.config.model:
        return error_response(404, f"The model {body.get('model')!r} does not exist.")
    mt = body.get("max_tokens")
    if not isinstance(mt, int) or isinstance(mt, bool) or mt <= 0:
        return error_response(400, "The 'max_tokens' field is required and must be a positive integer.")
    if body.get("stream"):
        return error_response(400, "The simulator answers /v1/messages without streaming.")
    try:
        prompt = render_chat(body.get("messages"))
    except PromptError as e:
        return error_response(400, str(e))
    n = min(mt, SESSION_LEN)
    words = output_words(prompt, n)
    return web.json_response({
        "id": "msg_" + hashlib.sha1(prompt.encode()).hexdigest()[:24], "type": "message", "role": "assistant",
        "model": st.config.model, "content": [{"type": "text", "text": output_text(words)}],
        "stop_reason": "max_tokens" if n == mt else "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": len(tokenize(prompt)), "output_tokens": len(words)},
    })
