"""`--instant`: answer at once with a fixed, precomputed completion (no engine), for router overhead benchmarks.

Each answer is prebuilt bytes: a non-streaming body, or a whole SSE stream sent in one write.  The request is
still parsed (model check, ``stream``, ``stream_options``) so errors stay realistic.  Usage is fixed:
``prompt_tokens`` 1, ``completion_tokens`` = ``--instant-tokens``, ``cached_tokens`` 0; ids are fixed too.
Faults that need no tokens (status, hang, reset, die, refuse) still apply.
"""

from __future__ import annotations

import json

from aiohttp import web

from .formats import ChatFormat, CompletionFormat, Format, usage_dict
from .state import JSON, admit, error_response
from .tokens import output_words

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class InstantAnswers:
    """Precomputed bodies: (kind, stream, include_usage) -> bytes."""

    def __init__(self, model: str, n_tokens: int) -> None:
        words = output_words("instant", n_tokens)
        usage = usage_dict(1, n_tokens, 0)
        self.bodies: dict[tuple[str, bool, bool], bytes] = {}
        for kind, cls in (("chat", ChatFormat), ("completion", CompletionFormat)):
            for inc in (False, True):
                fmt: Format = cls(model, include_usage=inc)
                fmt.id = f"{fmt.id_prefix}instant"
                self.bodies[(kind, True, inc)] = b"".join(fmt.tokens(words, 0, n_tokens) + fmt.tail("length", usage))
            self.bodies[(kind, False, False)] = cls(model).full(words, "length", usage)


async def _answer(request: web.Request, kind: str, field: str) -> web.StreamResponse:
    admitted = await admit(request)
    if isinstance(admitted, web.StreamResponse):
        return admitted
    st, _ = admitted
    try:
        body = json.loads(await request.read())
    except ValueError:
        return error_response(400, "Invalid JSON body")
    if not isinstance(body, dict) or field not in body:
        return error_response(400, f"The '{field}' field is required")
    if body.get("model") != st.config.model:
        return error_response(404, f"The model {body.get('model')!r} does not exist.")
    answers: InstantAnswers = request.app[INSTANT]
    st.stats.started += 1
    st.stats.completed += 1
    if not body.get("stream"):
        return web.Response(body=answers.bodies[(kind, False, False)], content_type=JSON)
    opts = body.get("stream_options")
    inc = bool(isinstance(opts, dict) and opts.get("include_usage"))
    resp = web.StreamResponse(headers=SSE_HEADERS)
    try:
        await resp.prepare(request)
        await resp.write(answers.bodies[(kind, True, inc)])
        await resp.write_eof()
    except ConnectionError:
        pass
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "chat", "messages")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "completion", "prompt")


INSTANT = web.AppKey("sim_instant", InstantAnswers)
