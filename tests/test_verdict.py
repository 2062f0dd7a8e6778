"""The relay's decisions as a table: every stage x kind x streaming, judged without any I/O (proxy/verdict.py)."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import pytest

from turbofleet.proxy.verdict import RETRYABLE_STATUS, Event, Kind, Stage, judge

C, A, S = Stage.CONNECT, Stage.ANSWER, Stage.STREAM
ERR = "ClientOSError"


class Want(NamedTuple):
    retry: str | None
    #: the client error's (status, code); None: no error for the client
    error: tuple[int, str] | None
    blame: str | None
    status: int = 0
    ok: bool = False


IMPOSSIBLE = None
GONE = Want(None, None, None, 499)
SHUT = Want(None, (503, "shutting_down"), None)


def _timeout(streaming: bool) -> Want:
    if streaming:
        return Want("first_byte_timeout", (504, "upstream_timeout"), "first-byte timeout")
    return Want(None, (504, "upstream_timeout"), "request timeout")  # the whole-answer cap is spent


#: (stage, kind) -> what is expected, for a stream and for a non-streaming request alike unless a function
#: of `streaming`; events are built by `_event` (a 503 for STATUS, an incomplete stream for END/CLIENT_GONE)
TABLE = {
    (C, Kind.STATUS): IMPOSSIBLE,
    (C, Kind.EMPTY): IMPOSSIBLE,
    (C, Kind.CONNECT_TIMEOUT): Want("connect_timeout", (504, "upstream_timeout"), ERR),
    (C, Kind.CONNECT_ERROR): Want("connect", (502, "upstream_failed"), ERR),
    (C, Kind.BROKEN): Want("reset", (502, "upstream_failed"), ERR),
    (C, Kind.TIMEOUT): _timeout,
    (C, Kind.SHUTDOWN): SHUT,
    (C, Kind.CLIENT_GONE): GONE,
    (C, Kind.CLIENT_STALLED): IMPOSSIBLE,
    (C, Kind.END): IMPOSSIBLE,
    (A, Kind.STATUS): Want("status_503", (503, "upstream_failed"), "status 503"),
    (A, Kind.EMPTY): Want("empty_stream", (502, "upstream_failed"), "empty stream"),
    (A, Kind.CONNECT_TIMEOUT): Want("broken", (502, "upstream_failed"), ERR),
    (A, Kind.CONNECT_ERROR): Want("broken", (502, "upstream_failed"), ERR),
    (A, Kind.BROKEN): Want("broken", (502, "upstream_failed"), ERR),
    (A, Kind.TIMEOUT): _timeout,
    (A, Kind.SHUTDOWN): SHUT,
    (A, Kind.CLIENT_GONE): GONE,
    (A, Kind.CLIENT_STALLED): IMPOSSIBLE,
    (A, Kind.END): IMPOSSIBLE,
    (S, Kind.STATUS): IMPOSSIBLE,
    (S, Kind.EMPTY): IMPOSSIBLE,
    (S, Kind.CONNECT_TIMEOUT): Want(None, (502, "upstream_failed"), ERR, 502),
    (S, Kind.CONNECT_ERROR): Want(None, (502, "upstream_failed"), ERR, 502),
    (S, Kind.BROKEN): Want(None, (502, "upstream_failed"), ERR, 502),
    (S, Kind.TIMEOUT): Want(None, (504, "upstream_idle_timeout"), "idle timeout", 504),
    (S, Kind.SHUTDOWN): Want(None, (503, "shutting_down"), None, 503),
    (S, Kind.CLIENT_GONE): GONE,
    (S, Kind.CLIENT_STALLED): Want(None, None, None, 499),
    (S, Kind.END): Want(None, (502, "upstream_truncated"), "truncated stream", 502),
}


def _event(stage: Stage, kind: Kind, streaming: bool, **kw: object) -> Event:
    base: dict[str, object] = {"status": 503, "error": ERR, "limit_s": 7.5}
    base.update(kw)
    return Event(stage, kind, streaming, **base)  # type: ignore[arg-type]


def test_the_table_covers_every_stage_and_kind() -> None:
    assert set(TABLE) == set(itertools.product(Stage, Kind))


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize(("stage", "kind"), list(TABLE), ids=[f"{s}-{k}" for s, k in TABLE])
def test_verdict_table(stage: Stage, kind: Kind, streaming: bool) -> None:
    want = TABLE[(stage, kind)]
    if callable(want):
        want = want(streaming)
    if want is None:
        with pytest.raises(ValueError, match="cannot happen"):
            judge(_event(stage, kind, streaming))
        return
    v = judge(_event(stage, kind, streaming))
    got = Want(v.retry, None if v.error is None else (v.error.status, v.error.code), v.blame, v.status, v.ok)
    assert got == want
    # the rules every row keeps
    if v.retry is not None:
        assert v.error is not None and stage is not Stage.STREAM  # never a retry once bytes went out
    if kind in (Kind.CLIENT_GONE, Kind.CLIENT_STALLED, Kind.SHUTDOWN):
        assert v.blame is None  # the client's doing, or the proxy's, never the worker's


@pytest.mark.parametrize(
    ("stage", "kind", "text"),
    [
        (C, Kind.CONNECT_TIMEOUT, "did not accept a connection within 7.5s"),
        (C, Kind.CONNECT_ERROR, f"could not be reached: {ERR}"),
        (A, Kind.BROKEN, f"broke the connection before answering: {ERR}"),
        (S, Kind.BROKEN, f"failed mid-stream: {ERR}"),
        (S, Kind.TIMEOUT, "sent nothing for 7.5s"),
        (A, Kind.TIMEOUT, "sent no token within 7.5s"),
    ],
)
def test_messages_name_the_cause(stage: Stage, kind: Kind, text: str) -> None:
    v = judge(_event(stage, kind, True))
    assert v.error is not None and text in v.error.message


def test_a_non_streaming_timeout_names_the_whole_answer() -> None:
    v = judge(_event(A, Kind.TIMEOUT, False))
    assert v.error is not None and "did not answer within 7.5s" in v.error.message


@pytest.mark.parametrize("stage", [C, A])
def test_shutdown_before_the_stream_asks_to_retry_elsewhere(stage: Stage) -> None:
    v = judge(_event(stage, Kind.SHUTDOWN, True))
    assert v.error is not None and v.error.headers == {"Retry-After": "1"}


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("status", [200, 400, 404, 429, 500, 502, 503, 504])
def test_worker_statuses(status: int, streaming: bool) -> None:
    v = judge(Event(A, Kind.STATUS, streaming, status, b'{"error": {"message": "busy"}}', "3"))
    if status in RETRYABLE_STATUS:
        assert v.retry == f"status_{status}" and v.error is not None
        assert (v.error.status, v.error.message, v.error.headers) == (
            status,
            f"Worker answered {status}: busy",
            {"Retry-After": "3"},
        )
        assert v.blame == (None if status == 429 else f"status {status}")  # 429 is load shedding, not a fault
    else:
        # passed on to the client as it is; a 5xx counts against the worker, a 4xx is the client's
        assert (v.retry, v.error, v.status, v.ok) == (None, None, status, status < 500)
        assert v.blame == (f"status {status}" if status >= 500 else None)


def test_a_worker_error_body_without_a_message() -> None:
    v = judge(Event(A, Kind.STATUS, False, 502, b"<html>bad gateway</html>"))
    assert v.error is not None and v.error.message == "Worker answered 502." and v.error.headers == {}


@pytest.mark.parametrize("kind", [Kind.END, Kind.CLIENT_GONE])
def test_a_complete_stream_is_a_success(kind: Kind) -> None:
    """The stream ended with `data: [DONE]`; a client hanging up right after it had the whole answer."""
    v = judge(_event(S, kind, True, complete=True))
    assert (v.retry, v.error, v.blame, v.status, v.ok) == (None, None, None, 200, True)
