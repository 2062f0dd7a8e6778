"""Request logs: one JSON line per request (the default when stdout is not a terminal), text by flag or on a
terminal; who, where, why, how long, tokens and tries; never the API key."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from tests.procs_kit import free_port, http_json, openai_client, start_proxy, start_sim, wait_until
from turbofleet.proxy import reqlog

MODEL = "sim-model"
KEY = "sk-very-secret-key-123"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_text_on_a_terminal_and_json_otherwise() -> None:
    assert reqlog.resolve("auto", _Tty()) == "text"
    assert reqlog.resolve(None, io.StringIO()) == "json"
    assert reqlog.resolve("TEXT", io.StringIO()) == "text"
    with pytest.raises(ValueError, match="log format"):
        reqlog.resolve("yaml")


def test_formatters_put_a_request_records_fields_on_the_line() -> None:
    fields = {"request_id": "r-1", "model": "m", "route": "prefix match 3/4", "status": 200, "tries": 1,
              "ttft_ms": None}
    rec = logging.LogRecord("turbofleet.requests", logging.INFO, __file__, 1, "request", None, None)
    rec.fields = fields
    doc = json.loads(reqlog.JsonFormatter().format(rec))
    assert doc["logger"] == "turbofleet.requests" and doc["level"] == "info" and doc["msg"] == "request"
    assert {k: doc[k] for k in fields} == fields
    text = reqlog.TextFormatter().format(rec)
    assert 'request_id=r-1 model=m route="prefix match 3/4" status=200 tries=1' in text and "ttft_ms" not in text
    plain = logging.LogRecord("turbofleet.proxy", logging.WARNING, __file__, 1, "worker %s out", ("w1",), None)
    assert json.loads(reqlog.JsonFormatter().format(plain))["msg"] == "worker w1 out"


def _requests(log: str) -> list[dict[str, Any]]:
    out = []
    for line in log.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("logger") == "turbofleet.requests":
            out.append(doc)
    return out


def test_json_timestamps_match_isoformat_to_the_millisecond() -> None:
    from datetime import UTC, datetime

    fmt = reqlog.JsonFormatter()
    # the last four round up at the microsecond, as datetime does, before the cut to milliseconds
    for created in (0.0, 1.0005, 1796285090.623882, 1796285090.999999, 1796285091.0, 1796285090.0001,
                    1796285090.9999995, 1796285090.0009997, 1.9999995, 1207042215.4939995):
        want = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
        record.created = created
        assert json.loads(fmt.format(record))["ts"] == want, created


def test_one_json_line_per_request_with_route_tokens_and_tries(tmp_path: Path) -> None:
    """Stdout is a file here, so the default is JSON. A dead worker first in round-robin order makes one request
    take two tries."""
    sim = start_sim(tmp_path, MODEL)
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = start_proxy(tmp_path, ["--policy", "round_robin", "--api-keys", KEY, "--worker", sim.url])
    try:
        status, _ = http_json("POST", proxy.url + "/nodes/add", {"url": dead, "status": {"models": [MODEL]}})
        assert status == 200
        c = openai_client(proxy.url + "/v1", api_key=KEY)
        for i in range(2):
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"hello {i} " * 20}],
                                      max_tokens=3, extra_headers={"X-Session-ID": "s-1"} if i else {})
        stream = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "streamed " * 20}],
                                           max_tokens=3, stream=True, stream_options={"include_usage": True})
        for _ in stream:
            pass
        status, _ = http_json("POST", proxy.url + "/v1/chat/completions", {"model": "nope", "messages": []},
                              headers={"Authorization": f"Bearer {KEY}"})
        assert status == 404
        lines = wait_until(lambda: len(_requests(proxy.output())) == 4 and _requests(proxy.output()), 15,
                           what="4 request lines")
    finally:
        proxy.stop()
        sim.stop()
    ok = [d for d in lines if d["status"] == 200]
    assert len(ok) == 3
    for d in ok:
        assert d["model"] == MODEL and d["worker"] == sim.url and d["path"] == "/v1/chat/completions"
        assert d["route"] and d["ttft_ms"] > 0 and d["duration_ms"] >= d["ttft_ms"]
        assert d["prompt_tokens"] > 0 and d["cached_tokens"] is not None and d["completion_tokens"] == 3
        assert "request_id" in d and "tenant" in d and "key_id" in d
    assert sorted(d["tries"] for d in ok) in ([1, 1, 2], [1, 2, 2])  # the dead worker's turn cost a try
    (missing,) = [d for d in lines if d["status"] == 404]
    assert missing["model"] == "nope" and missing["worker"] is None and missing["tries"] == 0
    assert KEY not in proxy.output()


def test_text_format_by_flag(tmp_path: Path) -> None:
    sim = start_sim(tmp_path, MODEL)
    proxy = start_proxy(tmp_path, ["--log-format", "text", "--worker", sim.url])
    try:
        openai_client(proxy.url + "/v1").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        line = wait_until(lambda: next((ln for ln in proxy.output().splitlines()
                                        if "turbofleet.requests: request" in ln), None), 15, what="a request line")
    finally:
        proxy.stop()
        sim.stop()
    assert f"model={MODEL}" in line and f"worker={sim.url}" in line and "status=200" in line and "tries=1" in line
    assert not line.lstrip().startswith("{")


def test_a_bad_log_format_is_refused_at_start(tmp_path: Path) -> None:
    from tests.procs_kit import spawn

    proc = spawn(["proxy", "--port", str(free_port()), "--log-format", "yaml"], tmp_path, "bad")
    assert proc.popen.wait(30) == 2 and "log format" in proc.output()
