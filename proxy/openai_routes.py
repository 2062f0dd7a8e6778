"""The OpenAI-compatible routes: parse what routing needs, hand the body through unchanged.

The body is parsed once, for the model, `stream`, the session key and the prompt text (whose block hashes
feed prefix-aware routing). The bytes sent upstream are the client's own bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from aiohttp import web

from turbofleet.balancer.policy import READY
from turbofleet.balancer.prefix import block_hashes

from .edge import check_model
from .errors import BadRequest, PayloadTooLarge, RequestTimeout
from .keys import BLOCK_CHARS, OUTLIERS, REGISTRY, RELAY, SETTINGS
from .relay import Body, Facts
from .validate import check_inference, parse_json_object

#: a session key longer than this is replaced by its digest: pins are then bounded in bytes, whatever the
#: client sends as `user` (issue 11)
MAX_SESSION_KEY = 128

#: rough characters per token, for the first-byte allowance and cost estimates before usage is known
CHARS_PER_TOKEN = 4
SESSION_HEADER = "X-Session-ID"


async def read_body(request: web.Request) -> bytes:
    """The raw body, bounded by max_body_bytes (413 beyond, checked before reading when announced) and by
    body_timeout (408: a client that trickles its body holds a connection and a handler)."""
    settings = request.app[SETTINGS]
    limit = settings.max_body_bytes
    n = request.content_length
    if n is not None and n > limit:
        raise PayloadTooLarge(f"Request body of {n} bytes exceeds the limit of {limit}.")
    try:
        if n and request.content.is_eof():
            # the whole body came with the headers (the usual case): nothing to wait for, so no timer
            return await _read_announced(request, n)
        async with asyncio.timeout(settings.body_timeout if settings.body_timeout > 0 else None):
            return await (_read_announced(request, n) if n else request.read())
    except web.HTTPRequestEntityTooLarge as e:
        raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.") from e
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {settings.body_timeout:g}s.") from None


async def _read_announced(request: web.Request, n: int) -> bytes:
    """A body of announced length in one call (issue 16: read() loops readany and copies twice)."""
    try:
        return await request.content.readexactly(n)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise BadRequest(f"The request body ended after {len(e.partial)} of {n} bytes.") from None
    # nothing left to read: someone read the body before us (read() keeps it) or none came
    return await request.read()


def prompt_text(data: dict[str, Any]) -> str:
    """The prompt as one string: chat messages in order (so a longer history extends a shorter one)."""
    messages = data.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):  # multi-part content: keep the text parts
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            parts.append(f"<|{m.get('role', '')}|> {content if content is not None else ''} ")
        return "".join(parts)
    for key in ("prompt", "input"):
        value = data.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and isinstance(value[0], str):
            return " ".join(value)
    return ""


def session_key(request: web.Request, data: dict[str, Any]) -> str | None:
    """The session: the X-Session-ID header, else the body's session_id, else its user."""
    header = request.headers.get(SESSION_HEADER)
    if header:
        return _bounded(header)
    for key in ("session_id", "user"):
        value = data.get(key)
        if value is not None and value != "" and value != -1:
            return _bounded(f"{key}:{value}")
    return None


def _bounded(key: str) -> str:
    if len(key) <= MAX_SESSION_KEY:
        return key
    return "h:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def facts_of(request: web.Request, data: dict[str, Any], *, require: tuple[str, ...] = (),
             default_model: str | None = None) -> Facts:
    check_inference(data)
    model = data.get("model", default_model)
    if not isinstance(model, str) or not model:
        raise BadRequest("The `model` field is required and must be a string.", param="model")
    check_model(request, model)
    for field in require:
        if field not in data:
            raise BadRequest(f"The `{field}` field is required.", param=field)
    if "messages" in require and not isinstance(data["messages"], list):
        raise BadRequest("`messages` must be a list.", param="messages")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("`stream` must be a boolean.", param="stream")
    text = prompt_text(data)
    stream_options = data.get("stream_options")
    return Facts(
        model=model,
        stream=stream,
        session_key=session_key(request, data),
        prefix_hashes=block_hashes(text, block_chars) if (block_chars := request.app[BLOCK_CHARS]) else (),
        prompt_tokens=len(text) // CHARS_PER_TOKEN,
        include_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
        user=user if isinstance(user := data.get("user"), str) else None,
    )


def parse_facts(request: web.Request, body: bytes, require: tuple[str, ...] = ()) -> Facts:
    """The body parsed and checked, and what routing needs from it. The parsed JSON lives only in here: a
    handler frame that kept it would hold it (a copy of the prompt, as Python objects) for a stream's whole
    life (issue 16: memory per open stream); the relay sends the client's own bytes."""
    data = parse_json_object(body)
    # LMDeploy's own routes (/generate, ...) may omit the model: a fleet of one model still routes them
    default = None
    if not require and "model" not in data:
        served = served_models(request.app)
        default = served[0] if len(served) == 1 else None
    return facts_of(request, data, require=require, default_model=default)


def _inference(path: str, require: tuple[str, ...] = ()) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = Body(await read_body(request))  # the relay drops the bytes once a stream started
        facts = parse_facts(request, body.data, require)
        return await request.app[RELAY].forward(request, path, body, facts)

    handler.__name__ = "forward_" + path.strip("/").replace("/", "_")
    return handler


def served_models(app: web.Application) -> list[str]:
    """Models served by at least one ready, non-ejected worker."""
    views = app[OUTLIERS].apply(app[REGISTRY].snapshot())
    return sorted({m for v in views if v.state == READY for m in v.models})


async def list_models(request: web.Request) -> web.Response:
    """The deduplicated union of models served by ready workers, in OpenAI's list format."""
    names = served_models(request.app)
    return web.json_response({
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 0, "owned_by": "turbofleet", "root": n, "parent": None}
                 for n in names],
    })


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", _inference("/v1/chat/completions", ("messages",)))
    app.router.add_post("/v1/completions", _inference("/v1/completions", ("prompt",)))
    # LMDeploy's other inference routes, passed through and routed by the body's model
    for path in ("/generate", "/v1/responses", "/v1/embeddings", "/v1/encode", "/v1/messages", "/pooling"):
        app.router.add_post(path, _inference(path))
    app.router.add_get("/v1/models", list_models)
