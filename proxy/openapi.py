"""`/openapi.json` (issue 11): every route the proxy serves, with the bodies the edge validates.

The inference bodies list only the fields the proxy reads (validate.py `InferenceBody`); every other field
passes through to the worker (`additionalProperties: true`). tests/test_security_openapi.py keeps this true:
every registered route is described and every described route is registered.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .validate import AddBody, HeartbeatBody, InferenceBody, StateBody, UrlBody

_ERROR = {"description": "An OpenAI-style error", "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/Error"}}}}
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]

#: (method, path) -> (summary, request body schema name or None, credential: "user" | "admin" | "worker" | None)
ROUTES: dict[tuple[str, str], tuple[str, str | None, str | None]] = {
    ("POST", "/v1/chat/completions"): ("OpenAI chat completions (streaming with `stream: true`)", "Chat", "user"),
    ("POST", "/v1/completions"): ("OpenAI completions", "Completion", "user"),
    ("POST", "/generate"): ("LMDeploy's /generate", "Inference", "user"),
    ("POST", "/v1/responses"): ("OpenAI responses (passed through)", "Inference", "user"),
    ("POST", "/v1/embeddings"): ("OpenAI embeddings (passed through)", "Inference", "user"),
    ("POST", "/v1/encode"): ("LMDeploy's /v1/encode (passed through)", "Inference", "user"),
    ("POST", "/v1/messages"): ("Anthropic-style messages (passed through)", "Inference", "user"),
    ("POST", "/pooling"): ("LMDeploy's /pooling (passed through)", "Inference", "user"),
    ("GET", "/v1/models"): ("Models served by ready workers", None, "user"),
    ("POST", "/nodes/add"): ("Register a worker (LMDeploy's body, plus the agent's fields)", "NodeAdd", "worker"),
    ("POST", "/nodes/remove"): ("Deregister a worker", "NodeUrl", "worker"),
    ("GET", "/nodes/status"): ("The fleet, in LMDeploy's shape plus turbofleet's view", None, "admin"),
    ("POST", "/nodes/heartbeat"): ("An agent's heartbeat with its worker's load", "Heartbeat", "worker"),
    ("POST", "/nodes/state"): ("Set a worker's state (ready, draining, ejected)", "NodeState", "worker"),
    ("POST", "/nodes/drain"): ("Drain a worker", "NodeUrl", "worker"),
    ("POST", "/nodes/terminate"): ("Ask a worker to exit, then forget it (admin only)", "NodeUrl", "admin"),
    ("POST", "/nodes/terminate_all"): ("Ask every worker to exit (admin only)", None, "admin"),
    ("GET", "/nodes/terminate_all"): ("LMDeploy's GET form: 405 unless --allow-terminate-get", None, "admin"),
    ("GET", "/health"): ("Liveness and a fleet summary (open)", None, None),
    ("GET", "/metrics"): ("Prometheus metrics (open)", None, None),
    ("GET", "/status"): ("The fleet as an HTML page", None, "admin"),
    ("GET", "/"): ("The fleet as an HTML page", None, "admin"),
    ("GET", "/openapi.json"): ("This description", None, None),
}


def _schema(model: Any) -> dict[str, Any]:
    s: dict[str, Any] = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = s.pop("$defs", {})
    return {"schema": s, "defs": defs}


def build() -> dict[str, Any]:
    """The OpenAPI 3.1 document (JSON Schema 2020-12 bodies, as pydantic writes them)."""
    schemas: dict[str, Any] = {
        "Error": {"type": "object", "required": ["error"], "properties": {
            "object": {"type": "string"},
            "error": {"type": "object", "required": ["message", "type"], "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
    }
    for name, model in (("Inference", InferenceBody), ("NodeAdd", AddBody), ("Heartbeat", HeartbeatBody),
                        ("NodeUrl", UrlBody), ("NodeState", StateBody)):
        got = _schema(model)
        schemas[name] = got["schema"]
        schemas.update(got["defs"])
    inference = schemas["Inference"]
    schemas["Chat"] = {"allOf": [{"$ref": "#/components/schemas/Inference"}],
                       "required": ["model", "messages"]}
    schemas["Completion"] = {"allOf": [{"$ref": "#/components/schemas/Inference"}],
                             "required": ["model", "prompt"]}
    inference["additionalProperties"] = True
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), (summary, body, cred) in ROUTES.items():
        op: dict[str, Any] = {
            "summary": summary,
            "operationId": f"{method.lower()}_{path.strip('/').replace('/', '_') or 'root'}",
            "parameters": [{"name": "X-Request-ID", "in": "header", "required": False,
                            "schema": {"type": "string", "maxLength": 128, "pattern": "^[A-Za-z0-9._:-]+$"}}],
            "responses": {"200": {"description": "OK"}, "400": _ERROR, "401": _ERROR, "403": _ERROR,
                          "404": _ERROR, "405": _ERROR, "413": _ERROR, "429": _ERROR, "502": _ERROR,
                          "503": _ERROR, "504": _ERROR, "508": _ERROR},
        }
        if cred is not None:
            op["security"] = _BEARER
            op["description"] = f"Credential: {cred} (see docs/SECURITY.md)."
        if body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
                "$ref": f"#/components/schemas/{body}"}}}}
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "turbofleet proxy", "version": "0.1.0",
                 "description": "A request-distribution proxy for LMDeploy fleets. Fields the proxy does not "
                                "read pass through to the worker unchanged."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(build())
