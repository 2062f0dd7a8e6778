"""Log output: one JSON object per line (for log shippers), or short text lines (for a terminal).

`--log-format json|text|auto` (auto, the default: text when stdout is a terminal, JSON otherwise). Logs go to
stdout. Every record is formatted the same way; the per-request record of `turbofleet.requests` (observe.py)
carries its fields in `record.fields`, which JSON puts at the top level and text writes as `key=value` pairs.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from datetime import UTC, datetime
from typing import IO, Any

FORMATS = ("auto", "json", "text")
_TEXT_FMT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: one encoder for every record: `json.dumps` with options builds a new JSONEncoder per call (stop 23: the
#: per-request line was 12 % of the proxy's CPU under bench overhead, its formatting half of that)
_ENCODE = json.JSONEncoder(ensure_ascii=False, default=str, separators=(",", ":")).encode


def resolve(fmt: str | None, stream: IO[str] | None = None) -> str:
    """`auto` (or None) -> text on a terminal, json otherwise."""
    fmt = (fmt or "auto").lower()
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt != "auto":
        return fmt
    s = stream or sys.stdout
    try:
        return "text" if s.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, then the record's `fields` (if any)."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._prefix = ""

    def _ts(self, created: float) -> str:
        """ISO 8601 in UTC to the millisecond, as `datetime.fromtimestamp(created, UTC).isoformat(timespec=
        "milliseconds")` writes it (rounded to the microsecond first, then cut); the part up to the second is
        formatted once a second."""
        frac, whole = math.modf(created)  # datetime's own steps, so that both round alike
        second, us = int(whole), round(frac * 1e6)
        if us >= 1_000_000:
            second, us = second + 1, us - 1_000_000
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{us // 1000:03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self._ts(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _ENCODE(out)


class TextFormatter(logging.Formatter):
    """The classic line; a request record's fields follow as key=value (None fields left out)."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FMT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line += " " + " ".join(f"{k}={_text(v)}" for k, v in fields.items() if v is not None)
        return line


def _text(v: Any) -> str:
    s = str(v)
    return json.dumps(s, ensure_ascii=False) if (not s or any(c in s for c in ' "=')) else s


def configure(level: str, fmt: str | None, stream: IO[str] | None = None) -> str:
    """Root logging for a proxy process; returns the format chosen."""
    out = stream or sys.stdout
    chosen = resolve(fmt, out)
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # no formatter here shows threads, processes or asyncio tasks: don't look them up for every record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if hasattr(logging, "logAsyncioTasks"):  # Python 3.12+
        logging.logAsyncioTasks = False
    return chosen
