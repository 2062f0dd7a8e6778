"""The generative endpoints: /v1/chat/completions, /v1/completions, /generate, /v1/responses, /v1/embeddings.

Every generative request becomes one engine sequence.  Streams wake once per engine step and write every
token emitted since the last write in one go.  When the client goes away (aiohttp cancels the handler, a
write fails, or the engine sees the transport closing) the sequence leaves the batch at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import struct
from typing import Any

from aiohttp import web

from .engine import Seq
from .faults import CHUNK_MODES, Fault
from .formats import ChatFormat, CompletionFormat, Format, GenerateFormat, ResponsesFormat, usage_dict
from .state import JSON, SimState, admit, die, error_response, reset_connection, wait_forever
from .tokens import PromptError, output_words, render_chat, render_completion, tokenize

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
EMBED_DIM = 32
#: tokens a sequence may reach (LMDeploy's session_len); longer max_tokens end with finish_reason "length"
SESSION_LEN = 32768


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _body(request: web.Request, st: SimState, need_model: bool = True) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise BadRequest(400, f"Invalid JSON body: {e}") from e
    if not isinstance(body, dict):
        raise BadRequest(400, "The request body must be a JSON object")
    model = body.get("model")
    if model is None and not need_model:
        return body
    if not isinstance(model, str):
        raise BadRequest(400, "The 'model' field is required")
    if model != st.config.model:
        raise BadRequest(404, f"The model {model!r} does not exist.")
    return body


def _max_tokens(body: dict[str, Any], keys: tuple[str, ...], default: int) -> int:
    for key in keys:
        v = body.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise BadRequest(400, f"The {key} {v!r} must be a positive integer.")
        # LMDeploy stops a sequence at its session length (finish_reason "length"); it never allocates
        # max_tokens up front, so an absurd number is no MemoryError (issue 11: it was a 500 here)
        return min(v, SESSION_LEN)
    return default


def _session_id(body: dict[str, Any]) -> int:
    v = body.get("session_id", -1)
    return v if isinstance(v, int) and not isinstance(v, bool) else -1


def _check_sampling(body: dict[str, Any]) -> None:
    """LMDeploy's sampling checks (same messages), so a router sees the same 400s as from the real server."""
    n, top_p, top_k, temp = body.get("n"), body.get("top_p"), body.get("top_k"), body.get("temperature")
    num = (int, float)
    if n is not None and (not isinstance(n, int) or n <= 0):
        raise BadRequest(400, f"The n {n!r} must be a positive int.")
    if top_p is not None and (not isinstance(top_p, num) or not 0 < top_p <= 1):
        raise BadRequest(400, f"The top_p {top_p!r} must be in (0, 1].")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise BadRequest(400, f"The top_k {top_k!r} cannot be a negative integer.")
    if temp is not None and (not isinstance(temp, num) or not 0 <= temp <= 2):
        raise BadRequest(400, f"The temperature {temp!r} must be in [0, 2]")


def _include_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return bool(isinstance(opts, dict) and opts.get("include_usage"))


async def _serve(request: web.Request, parse: Any, need_model: bool = True) -> web.StreamResponse:
    """Shared front half: auth, faults, parsing; then generate."""
    admitted = await admit(request)
    if isinstance(admitted, web.StreamResponse):
        return admitted
    st, outcome = admitted
    try:
        fmt, prompt, max_tokens, stream, session_id = parse(await _body(request, st, need_model), st)
    except BadRequest as e:
        return error_response(e.status, e.message)
    except PromptError as e:
        return error_response(400, str(e))
    if st.engine.session_busy(session_id):
        return error_response(400, f"The session_id {session_id!r} is occupied.")
    return await generate(request, st, fmt, prompt, max_tokens, stream, session_id, outcome)


def _parse_chat(body: dict[str, Any], st: SimState) -> tuple[Format, str, int, bool, int]:
    if "messages" not in body:
        raise BadRequest(400, "The 'messages' field is required")
    _check_sampling(body)
    prompt = render_chat(body["messages"])
    mt = _max_tokens(body, ("max_completion_tokens", "max_tokens"), st.config.default_max_tokens)
    return (ChatFormat(st.config.model, _include_usage(body)), prompt, mt, bool(body.get("stream")), _session_id(body))


def _parse_completion(body: dict[str, Any], st: SimState) -> tuple[Format, str, int, bool, int]:
    if "prompt" not in body:
        raise BadRequest(400, "The 'prompt' field is required")
    _check_sampling(body)
    prompt = render_completion(body["prompt"])
    mt = _max_tokens(body, ("max_completion_tokens", "max_tokens"), st.config.default_max_tokens)
    return (
        CompletionFormat(st.config.model, _include_usage(body)),
        prompt,
        mt,
        bool(body.get("stream")),
        _session_id(body),
    )


def _parse_generate(body: dict[str, Any], st: SimState) -> tuple[Format, str, int, bool, int]:
    prompt_in = body.get("prompt")
    ids = body.get("input_ids")
    if (prompt_in is None) == (ids is None):
        raise BadRequest(400, "You must specify exactly one of prompt or input_ids")
    _check_sampling(body)
    prompt = render_completion(prompt_in if prompt_in is not None else ids)
    mt = _max_tokens(body, ("max_tokens", "request_output_len"), st.config.default_max_tokens)
    fmt = GenerateFormat(st.config.model, len(tokenize(prompt)))
    fmt.max_tokens = mt
    return fmt, prompt, mt, bool(body.get("stream")), _session_id(body)


def _parse_responses(body: dict[str, Any], st: SimState) -> tuple[Format, str, int, bool, int]:
    inp = body.get("input")
    if inp is None:
        raise BadRequest(400, "The 'input' field is required")
    messages: list[Any] = [{"role": "user", "content": inp}] if isinstance(inp, str) else inp
    if isinstance(body.get("instructions"), str) and isinstance(messages, list):
        messages = [{"role": "system", "content": body["instructions"]}, *messages]
    prompt = render_chat(messages)
    mt = _max_tokens(body, ("max_output_tokens",), st.config.default_max_tokens)
    return ResponsesFormat(st.config.model), prompt, mt, bool(body.get("stream")), -1


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, _parse_chat)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, _parse_completion)


async def generate_endpoint(request: web.Request) -> web.StreamResponse:
    return await _serve(request, _parse_generate, need_model=False)


async def responses(request: web.Request) -> web.StreamResponse:
    return await _serve(request, _parse_responses)


async def generate(
    request: web.Request,
    st: SimState,
    fmt: Format,
    prompt: str,
    max_tokens: int,
    stream: bool,
    session_id: int,
    fault: Fault | None,
) -> web.StreamResponse:
    """Run one sequence through the engine and answer it (streaming or not)."""
    engine = st.engine
    slow = fault.factor if fault is not None and fault.mode == "slow" and fault.count is not None else 1.0
    seq = engine.new_seq(
        tokenize(prompt), output_words(prompt, max_tokens), session_id, stream, request.transport, slow
    )
    engine.submit(seq)
    limit = fault.chunks if fault is not None and fault.mode in CHUNK_MODES else None
    loop = asyncio.get_running_loop()
    try:
        if stream:
            return await _stream(request, st, seq, fmt, fault, limit)
        return await _unary(request, st, seq, fmt, fault, limit)
    except asyncio.CancelledError:
        engine.cancel(seq, loop.time(), "handler_cancelled")
        raise
    finally:
        if not seq.finished:  # any other way out of the handler
            engine.cancel(seq, loop.time(), "handler_exit")


async def _fire(request: web.Request, st: SimState, seq: Seq, fault: Fault) -> None:
    """A chunk-mode fault reached its count: die, reset, or go silent."""
    if fault.mode == "die_after_chunks":
        await die(request, fault.exit_code)
    st.engine.drop(seq)
    if fault.mode == "abort_after_chunks":
        reset_connection(request)
    else:  # stall_after_chunks
        await wait_forever(st)


async def _unary(
    request: web.Request, st: SimState, seq: Seq, fmt: Format, fault: Fault | None, limit: int | None
) -> web.StreamResponse:
    if fault is not None and limit is not None and limit <= seq.max_tokens:
        await seq.wait_until(limit)
        if seq.emitted >= limit:
            await _fire(request, st, seq, fault)
            return web.Response(status=500)  # the connection is gone
    await seq.wait_until(seq.max_tokens)
    if seq.finish_reason not in ("length", "abort"):
        return web.Response(status=499)  # cancelled: nobody is listening
    usage = usage_dict(seq.prompt_len, seq.emitted, seq.cached_tokens)
    return web.Response(body=fmt.full(seq.words[: seq.emitted], seq.finish_reason, usage), content_type=JSON)


async def _stream(
    request: web.Request, st: SimState, seq: Seq, fmt: Format, fault: Fault | None, limit: int | None
) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    events = 0
    sent = 0
    loop = asyncio.get_running_loop()
    try:
        await resp.prepare(request)  # the status line and headers go out now, before the first token
        if limit == 0 and fault is not None:
            await _fire(request, st, seq, fault)
            return resp
        while True:
            await seq.wait_until(sent + 1)
            n = seq.emitted
            parts: list[bytes] = fmt.tokens(seq.words, sent, n) if n > sent else []
            sent = n
            if seq.finished:
                if seq.finish_reason not in ("length", "abort"):
                    return resp  # cancelled or dropped: nobody is listening
                usage = usage_dict(seq.prompt_len, seq.emitted, seq.cached_tokens)
                parts += fmt.tail(seq.finish_reason or "length", usage)
            if parts:
                if limit is not None and fault is not None and events + len(parts) >= limit:
                    k = limit - events
                    if k > 0:
                        await resp.write(b"".join(parts[:k]))
                    await _fire(request, st, seq, fault)
                    return resp
                await resp.write(parts[0] if len(parts) == 1 else b"".join(parts))
                events += len(parts)
            if seq.finished:
                break
        await resp.write_eof()
    except ConnectionError:
        st.engine.cancel(seq, loop.time(), "write_failed")
    return resp


# -- embeddings ----------------------------------------------------------------------------------------------
def embed(text: str, dim: int = EMBED_DIM) -> list[float]:
    """A deterministic unit vector for `text`."""
    digest = hashlib.blake2b(text.encode(), digest_size=dim * 2).digest()
    vals = [v / 32768.0 - 1.0 for v in struct.unpack(f"<{dim}H", digest)]
    norm = math.sqrt(sum(v * v for v in vals)) or 1.0
    return [round(v / norm, 6) for v in vals]


async def embeddings(request: web.Request) -> web.StreamResponse:
    admitted = await admit(request)
    if isinstance(admitted, web.StreamResponse):
        return admitted
    st, _ = admitted
    try:
        body = await _body(request, st, need_model=False)
    except BadRequest as e:
        return error_response(e.status, e.message)
    inp = body.get("input")
    texts = [inp] if isinstance(inp, str) else inp
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return error_response(400, "The 'input' field must be a string or a non-empty list of strings")
    n = sum(len(tokenize(t)) for t in texts)
    data = [{"object": "embedding", "index": i, "embedding": embed(t)} for i, t in enumerate(texts)]
    out = {"object": "list", "data": data, "model": st.config.model, "usage": {"prompt_tokens": n, "total_tokens": n}}
    return web.json_response(out)
