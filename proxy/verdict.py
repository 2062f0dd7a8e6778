"""What an upstream try's ending means: the relay's decisions, apart from its I/O.

The relay (`proxy/relay.py`) watches a try and describes how it ended as an `Event`: the stage it reached,
what happened, whether the client asked for a stream. `judge(event)` answers, without any I/O, with a
`Verdict`: retry on another worker (and why), what the client gets, whether the worker is to blame (passive
ejection counts it), and the status the try is recorded under. The relay then acts on the verdict.

The rules, in one place:
- before anything reached the client (stages CONNECT and ANSWER), a failure of the worker is retried on
  another one: connect refused or timed out, a reset, a broken or empty answer, 429/502/503 (429 is load
  shedding, not a fault: it is retried but not blamed), a stream's first-byte timeout. A non-streaming
  request's timeout is not retried: its whole-answer cap is spent, another try would double the wait;
- once bytes reached the client (stage STREAM), nothing is retried: a failure ends the stream with an
  OpenAI-style error event;
- the client's own doing (it left, or it stopped reading) never counts against the worker, nor does the
  proxy's shutdown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

from .errors import ProxyError, UpstreamFailed, UpstreamTimeout

#: statuses from a worker that mean "try another one" (the worker did not do the work)
RETRYABLE_STATUS = frozenset({429, 502, 503})


class Stage(StrEnum):
    """How far a try got."""

    #: the worker has not answered yet (connecting, sending the request, waiting for its status line)
    CONNECT = "connect"
    #: the worker answered (status and headers) but nothing has gone to the client yet
    ANSWER = "answer"
    #: bytes went to the client: from here only an SSE error event can tell it something went wrong
    STREAM = "stream"


class Kind(StrEnum):
    """What happened."""

    #: ANSWER: the worker's status (`Event.status`); a retryable one is retried, any other is passed on
    STATUS = "status"
    #: ANSWER: a 200 stream closed before its first byte
    EMPTY = "empty"
    #: CONNECT: the worker did not accept a connection in time (`Event.limit_s`)
    CONNECT_TIMEOUT = "connect_timeout"
    #: CONNECT: the worker could not be reached (refused, unreachable)
    CONNECT_ERROR = "connect_error"
    #: the connection broke (`Event.error` names the exception): a reset at CONNECT, at ANSWER a broken answer,
    #: at STREAM a mid-stream failure. At ANSWER and STREAM the CONNECT_* kinds mean this too
    BROKEN = "broken"
    #: the try's deadline (`Event.limit_s`): first byte or whole answer before the stream, idle gap during it
    TIMEOUT = "timeout"
    #: the proxy's shutdown grace period ended
    SHUTDOWN = "shutdown"
    #: the client disconnected
    CLIENT_GONE = "client_gone"
    #: STREAM: the idle deadline fired while the client was not reading what it was sent
    CLIENT_STALLED = "client_stalled"
    #: STREAM: the worker closed the stream
    END = "end"


@dataclass(frozen=True, slots=True)
class Event:
    """How one try ended, as the relay saw it."""

    stage: Stage
    kind: Kind
    #: the client asked for a stream
    streaming: bool = False
    #: STATUS: the worker's status code
    status: int = 0
    #: STATUS: the start of the worker's error body (its message is passed on)
    body: bytes = b""
    #: STATUS: the worker's Retry-After header
    retry_after: str | None = None
    #: BROKEN, CONNECT_*: the exception's type name (for the message and the blame)
    error: str = ""
    #: TIMEOUT, CONNECT_TIMEOUT: the limit that ran out, in seconds
    limit_s: float = 0.0
    #: STREAM (END, CLIENT_GONE): the client has the whole answer (an SSE stream's `data: [DONE]` went out;
    #: for END also any stream on a path without that marker)
    complete: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the relay is to do about an `Event`."""

    #: retry on another worker, for this reason (metrics label); `error` is raised when none is left
    retry: str | None = None
    #: what the client gets: raised before the stream started, sent as an SSE error event after
    error: ProxyError | None = None
    #: counts against the worker (passive ejection), for this reason; None: not the worker's fault
    blame: str | None = None
    #: the status the try is recorded under (0: none of its own, the error raised tells)
    status: int = 0
    #: the try succeeded
    ok: bool = False


def shutting_down() -> ProxyError:
    """What a request gets before its stream started when the proxy's grace period ends."""
    return ProxyError(
        "The proxy is shutting down; retry on another replica.",
        status=503,
        code="shutting_down",
        headers={"Retry-After": "1"},
    )


def upstream_message(text: bytes, status: int) -> str:
    """The message for a worker's error status, with the worker's own message when its body has one."""
    try:
        parsed = json.loads(text)
        msg = parsed.get("error", {}).get("message") if isinstance(parsed, dict) else None
        if isinstance(msg, str) and msg:
            return f"Worker answered {status}: {msg}"
    except (ValueError, AttributeError):
        pass
    return f"Worker answered {status}."


#: the verdicts of a finished stream and of a client leaving after it had everything: a success
STREAM_OK = Verdict(status=200, ok=True)
CLIENT_LEFT = Verdict(status=499)
_ANSWERED: dict[int, Verdict] = {}


def _answered(status: int) -> Verdict:
    """A whole answer passed on as it is: a worker answering 5xx to everything is as broken as one that is down."""
    v = _ANSWERED.get(status)
    if v is None:
        v = Verdict(status=status, ok=status < 500, blame=f"status {status}" if status >= 500 else None)
        if len(_ANSWERED) < 1024:
            _ANSWERED[status] = v
    return v


def judge(e: Event) -> Verdict:
    """The verdict on an event (see the module docstring). ValueError for a kind that cannot happen at its
    stage (a status mid-stream, an END before any answer)."""
    kind, stage = e.kind, e.stage
    if kind is Kind.CLIENT_GONE:
        return STREAM_OK if stage is Stage.STREAM and e.complete else CLIENT_LEFT
    if kind is Kind.SHUTDOWN:
        if stage is Stage.STREAM:
            return Verdict(
                error=ProxyError("The proxy is shutting down.", status=503, code="shutting_down"), status=503
            )
        return Verdict(error=shutting_down())
    if stage is Stage.STREAM:
        return _streaming(e)
    if kind is Kind.TIMEOUT:
        if not e.streaming:
            # the whole-answer cap is spent: another try would double the client's wait (no retry)
            return Verdict(
                error=UpstreamTimeout(f"The worker did not answer within {e.limit_s:g}s."), blame="request timeout"
            )
        return Verdict(
            retry="first_byte_timeout",
            error=UpstreamTimeout(f"The worker sent no token within {e.limit_s:g}s."),
            blame="first-byte timeout",
        )
    if stage is Stage.CONNECT:
        if kind is Kind.CONNECT_TIMEOUT:
            msg = f"The worker did not accept a connection within {e.limit_s:g}s."
            return Verdict(retry="connect_timeout", error=UpstreamTimeout(msg), blame=e.error)
        if kind is Kind.CONNECT_ERROR or kind is Kind.BROKEN:
            msg = f"The worker could not be reached: {e.error}."
            return Verdict(
                retry="connect" if kind is Kind.CONNECT_ERROR else "reset", error=UpstreamFailed(msg), blame=e.error
            )
        raise ValueError(f"{kind} cannot happen before the worker answered")
    # Stage.ANSWER: the worker answered, nothing went to the client yet
    if kind is Kind.STATUS:
        status = e.status
        if status not in RETRYABLE_STATUS:
            return _answered(status)
        headers = {"Retry-After": e.retry_after} if e.retry_after else {}
        return Verdict(
            retry=f"status_{status}",
            error=UpstreamFailed(upstream_message(e.body, status), status=status, headers=headers),
            # 429 is load shedding, not a fault: it does not count towards ejection
            blame=None if status == 429 else f"status {status}",
        )
    if kind is Kind.EMPTY:
        return Verdict(
            retry="empty_stream",
            error=UpstreamFailed("The worker closed the stream without data."),
            blame="empty stream",
        )
    if kind is Kind.BROKEN or kind is Kind.CONNECT_ERROR or kind is Kind.CONNECT_TIMEOUT:
        # nothing went to the client yet, so another worker may still save the request
        msg = f"The worker broke the connection before answering: {e.error}."
        return Verdict(retry="broken", error=UpstreamFailed(msg), blame=e.error)
    raise ValueError(f"{kind} cannot happen before the stream started")


def _streaming(e: Event) -> Verdict:
    """Stage STREAM, after the cases every stage shares."""
    kind = e.kind
    if kind is Kind.END:
        if e.complete:
            return STREAM_OK
        # the worker closed the connection without finishing the stream
        return Verdict(
            error=UpstreamFailed("The worker ended the stream early.", code="upstream_truncated"),
            blame="truncated stream",
            status=502,
        )
    if kind is Kind.BROKEN or kind is Kind.CONNECT_ERROR or kind is Kind.CONNECT_TIMEOUT:
        return Verdict(error=UpstreamFailed(f"The worker failed mid-stream: {e.error}."), blame=e.error, status=502)
    if kind is Kind.CLIENT_STALLED:
        # the client stopped reading, not the worker: drop the connection, blame nobody upstream
        return Verdict(status=499)
    if kind is Kind.TIMEOUT:
        msg = f"The worker sent nothing for {e.limit_s:g}s."
        return Verdict(error=UpstreamTimeout(msg, code="upstream_idle_timeout"), blame="idle timeout", status=504)
    raise ValueError(f"{kind} cannot happen once the stream started")
