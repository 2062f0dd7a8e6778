"""Input validation at the edge (issue 11): the JSON parser with a depth bound, strict pydantic models for the
fields routing reads, and the node API's bodies.

Only what the proxy itself reads is checked; every other field passes through to the worker untouched, byte
for byte (the models `extra="allow"` and the relay forwards the client's own bytes). A value the proxy reads
and cannot trust (a `max_tokens` of 10**400, a prompt list holding an object) is a 400 here, before routing,
so a worker never sees a request that makes it fail and never gets blamed for one.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from .errors import BadRequest

#: JSON nesting deeper than this is refused before `json.loads` could recurse (RecursionError at ~1000)
MAX_JSON_DEPTH = 64
#: the largest max_tokens-like number accepted (LMDeploy's own context windows are far below it)
MAX_TOKENS_LIMIT = 10_000_000
#: model names, session ids, users: the proxy keys maps on them, so they are bounded
MAX_NAME_CHARS = 256
MAX_ID_CHARS = 1024


def json_depth_ok(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """False when the JSON text nests deeper than `limit` (brackets outside strings). Linear, no recursion."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return True  # cannot nest deeper than the number of openers: the common case costs two counts
    depth = 0
    in_str = False
    escaped = False
    for byte in body:
        if in_str:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_str = False
        elif byte == 0x22:
            in_str = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_json_object(body: bytes, limit: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """The body as a JSON object, or a 400 (empty, not JSON, nested too deep, NaN/Infinity, not an object)."""
    if not body:
        raise BadRequest("The request body is empty; a JSON object is required.")
    if not json_depth_ok(body, limit):
        raise BadRequest(f"The request body nests deeper than {limit} levels.")
    try:
        # what json.loads does with bytes, on one decoder built once (loads builds one per call when given a
        # parse_constant)
        data = _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except RecursionError as e:  # pragma: no cover - json_depth_ok keeps the parser far from the limit
        raise BadRequest("The request body nests too deeply.") from e
    except (ValueError, UnicodeDecodeError) as e:
        # the parser's message names a position only, never the body's text
        raise BadRequest(f"The request body is not valid JSON: {type(e).__name__} at {_where(e)}.") from e
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    return data


def _where(e: Exception) -> str:
    pos = getattr(e, "pos", None)
    return f"byte {pos}" if isinstance(pos, int) else "an unknown position"


def _first_error(e: ValidationError) -> tuple[str, str]:
    err = e.errors(include_url=False, include_input=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    return loc, str(err["msg"])


# ---------------------------------------------------------------- inference bodies

Name = Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME_CHARS)]
TokenCount = Annotated[StrictInt, Field(ge=0, le=MAX_TOKENS_LIMIT)]
Prompt = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: StrictStr | None = None
    content: StrictStr | list[dict[str, Any]] | None = None


class InferenceBody(BaseModel):
    """The fields routing (and the worker's sizing) read on the inference routes; the rest is the worker's."""

    model_config = ConfigDict(extra="allow")

    model: Name | None = None
    stream: StrictBool = False
    messages: StrictStr | list[_Message] | None = None  # LMDeploy also takes a bare string
    prompt: Prompt | None = None
    input: Prompt | list[dict[str, Any]] | None = None
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    max_new_tokens: TokenCount | None = None
    max_output_tokens: TokenCount | None = None
    min_new_tokens: TokenCount | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    session_id: Annotated[StrictInt, Field(ge=-1, le=2**63 - 1)] | Annotated[StrictStr, Field(max_length=MAX_ID_CHARS)] | None = None  # noqa: E501
    user: Annotated[StrictStr, Field(max_length=MAX_ID_CHARS)] | None = None
    stream_options: dict[str, Any] | None = None


def check_inference(data: dict[str, Any]) -> None:
    """400 when a field the proxy reads has the wrong type or an absurd value."""
    try:
        InferenceBody.model_validate(data)
    except ValidationError as e:
        loc, msg = _first_error(e)
        field = loc.split(".", 1)[0]
        raise BadRequest(f"`{loc}`: {msg}.", param=field or None) from None


# ---------------------------------------------------------------- node API bodies

M = TypeVar("M", bound=BaseModel)

Count = Annotated[StrictInt, Field(ge=0, le=1_000_000)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False, strict=True)]
Url = Annotated[StrictStr, Field(min_length=1, max_length=2048)]


class LoadBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    running: Count | None = 0
    waiting: Count | None = 0
    kv_usage: Fraction | None = 0.0
    prefix_hit_rate: Fraction | None = 0.0


class HeartbeatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    url: Url
    load: LoadBody | None = None


class UrlBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    url: Url
    #: set when an agent removes itself (issue 18: its late heartbeat 404 must not bring it back)
    agent_id: Annotated[StrictStr, Field(max_length=128)] | None = None


class StateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    url: Url
    state: StrictStr | None = None


class StatusBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    models: Annotated[list[Name], Field(max_length=256)] | None = None
    role: Annotated[StrictInt, Field(ge=1, le=3)] | None = 1


class AddBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    url: Url
    status: StatusBody | None = None
    labels: Annotated[dict[Annotated[str, Field(max_length=128)], Annotated[StrictStr | StrictInt | StrictFloat | StrictBool, Field()]], Field(max_length=64)] | None = None  # noqa: E501
    capacity: Annotated[StrictInt, Field(ge=0, le=1_000_000)] | None = None
    gpu: dict[str, Any] | None = None
    heartbeat_ttl: Annotated[float, Field(gt=0.0, le=86_400.0, allow_inf_nan=False, strict=True)] | None = None
    source: Annotated[StrictStr, Field(max_length=32)] | None = None
    state: StrictStr | None = None
    #: the registering agent's id, and whether this registration answers a heartbeat 404 (issue 18: tombstones)
    agent_id: Annotated[StrictStr, Field(max_length=128)] | None = None
    rejoin: StrictBool = False


def node_body(model: type[M], data: dict[str, Any]) -> M:
    """A node API body as `model`, or a 400 naming the first bad field (never echoing its value)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        loc, msg = _first_error(e)
        raise BadRequest(f"`{loc}`: {msg}.", param=loc.split(".", 1)[0] or None) from None
