"""Proxy settings, built once in `main()` from flags and `TURBOFLEET_*` environment variables, then frozen.

Precedence: command-line flag > environment variable > default. Nothing else in the proxy reads os.environ.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Settings(BaseModel):
    """Everything the proxy can be told. Times are in seconds, sizes in bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "0.0.0.0"
    port: int = 8000
    policy: str = "kv_aware"
    #: None or "memory" for the in-process registry; "redis://HOST:PORT/DB" for the shared one
    registry: str | None = None
    registry_prefix: str = "turbofleet"
    replica_id: str | None = None
    #: static workers registered at start (their models are read from /v1/models)
    workers: tuple[str, ...] = ()

    # security: client keys for the inference routes, an admin token for the node API and fleet details
    api_keys: tuple[str, ...] = ()
    admin_token: str | None = None
    #: sent upstream as `Authorization: Bearer ...` when set; otherwise nothing is (see forward_client_auth)
    worker_api_key: str | None = None

    # security perimeter (issue 11; docs/SECURITY.md)
    #: a YAML/JSON file of keys -> tenants and limits, re-read on SIGHUP
    api_keys_file: str | None = None
    #: the token agents send: register, heartbeat, drain, deregister (never terminate or fleet details)
    worker_token: str | None = None
    #: who may call the node API's writes and what URLs may be registered: CIDRs or host names
    allow_nodes: tuple[str, ...] = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                    "fc00::/7")
    #: most workers registered at once (0: unlimited)
    max_nodes: int = 256
    #: LMDeploy's open node API: anyone may register anything and terminate everything (loud warning)
    insecure_open_admin: bool = False
    #: answer LMDeploy's `GET /nodes/terminate_all` (a GET can be fired by a link or an image tag)
    allow_terminate_get: bool = False
    #: send the client's own Authorization header to workers (when no worker_api_key is set)
    forward_client_auth: bool = False
    #: idle keep-alive connections from clients close after this long
    keepalive_timeout: float = 15.0
    #: a client must send a request's headers within this long, and its body within body_timeout
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    #: a streaming client that reads nothing for this long is dropped (its worker freed), idle gap or not
    slow_client_timeout: float = 10.0
    #: requests one key (or, without keys, one client address) may have in flight on this replica (0: no cap)
    max_concurrency_per_client: int = 0

    # limits
    max_body_bytes: int = 32 * 1024 * 1024
    #: requests the proxy accepts at once; beyond it clients get 429 (0: unlimited)
    max_concurrency: int = 0

    # timeouts
    connect_timeout: float = 3.0
    #: time to the first response byte: base plus an allowance per prompt token (long prompts prefill longer)
    first_byte_timeout: float = 60.0
    first_byte_timeout_per_token: float = 0.002
    #: longest silence between two chunks of a streaming response
    idle_timeout: float = 60.0
    #: whole-response cap for non-streaming requests (LMDeploy answers only when generation is done)
    request_timeout: float = 600.0

    # retries
    max_tries: int = 3
    #: retries may be at most this fraction of requests in flight (Envoy's retry budget), but always
    #: at least `retry_min_concurrency` at once
    retry_budget: float = 0.2
    retry_min_concurrency: int = 3

    # sessions
    pin_ttl: float = 1800.0

    # health
    health_interval: float = 5.0
    health_timeout: float = 2.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    eject_consecutive_failures: int = 5
    eject_base_s: float = 30.0
    eject_max_s: float = 300.0
    #: never eject more than this fraction of a model's workers (at least one always stays)
    eject_max_fraction: float = 0.5
    #: a worker registered by an agent is gone after this long without a heartbeat
    heartbeat_ttl: float = 15.0
    #: issue 18: a heartbeating worker silent this long is removed from the registry (0: never)
    reap_after: float = 120.0

    # shutdown
    shutdown_grace: float = 30.0

    # upstream connection pool
    pool_size: int = 1000
    pool_per_host: int = 0

    # issue 10: admission control, the queue and fair shares (proxy/flow.py, proxy/admission.py)
    #: "on" queues requests for a saturated model; "off" forwards everything at once (as before)
    admission: str = "on"
    #: queue budget per class: seconds for all, or "interactive=2,default=5,batch=30"
    queue_timeout: str = "interactive=2,default=5,batch=30"
    #: queued requests per model, 429 beyond
    queue_max: int = 1000
    #: per-worker concurrency limit: 0 learns it from delivered TTFT (balancer/saturation.py)
    worker_concurrency: int = 0
    worker_concurrency_initial: int = 16
    worker_concurrency_max: int = 256
    #: a slower first token than this lowers a worker's learned limit
    target_ttft: float = 1.0
    #: placement looks this many queued requests ahead (in fair order) for the one a freed worker fits best
    placement_window: int = 8
    #: a worker with this many seconds of prefill queued ahead of a new request is full (0: off)
    prefill_backlog_max: float = 1.0
    #: share of each worker's limit and prefill backlog kept for the interactive class
    interactive_reserve: float = 0.2
    # issue 16: `--processes N|auto` event-loop processes on one port (proxy/supervisor.py); each child binds
    # with SO_REUSEPORT
    processes: str = "1"
    reuse_port: bool = False

    log_level: str = "info"
    access_log: bool = False
    # issue 12: the log's format (auto: text on a terminal, JSON lines otherwise); one line per request
    log_format: str = "auto"
    #: issue 12: OpenTelemetry traces (the otel extra): auto (on when OTEL_EXPORTER_OTLP_* names an endpoint), on, off
    tracing: str = "auto"
    policy_options: dict[str, Any] = Field(default_factory=dict)


#: flag name -> (type, help); types drive both argparse and env parsing
_FLAGS: dict[str, tuple[type, str]] = {
    "policy": (str, "routing policy (kv_aware, least_queue, round_robin, random, min_expected_latency, "
                    "min_observed_latency)"),
    "registry": (str, "memory (default) or redis://HOST:PORT/DB to share the fleet between replicas"),
    "registry_prefix": (str, "prefix of every Redis key"),
    "replica_id": (str, "this replica's id in the shared registry (default: host-pid)"),
    "admin_token": (str, "token for the node API (/nodes/*) and the fleet's details (/nodes/status, /status); "
                         "without it only allowlisted addresses may register and terminate* is refused"),
    "api_keys_file": (str, "YAML/JSON file of API keys with tenants and limits (re-read on SIGHUP)"),
    "worker_token": (str, "token agents send to register and heartbeat (turbofleet worker --token)"),
    "max_nodes": (int, "most workers registered at once, 429 beyond (0: unlimited)"),
    "keepalive_timeout": (float, "seconds an idle client connection stays open"),
    "header_timeout": (float, "seconds a client has to send a request's headers"),
    "body_timeout": (float, "seconds a client has to send a request's body (408 beyond)"),
    "slow_client_timeout": (float, "seconds a streaming client may read nothing before it is dropped"),
    "max_concurrency_per_client": (int, "requests in flight per key (or client address) on this replica"),
    "worker_api_key": (str, "API key sent to workers"),
    "max_body_bytes": (int, "largest request body accepted (413 beyond)"),
    "max_concurrency": (int, "requests accepted at once, 429 beyond (0: unlimited)"),
    "connect_timeout": (float, "seconds to connect to a worker"),
    "first_byte_timeout": (float, "seconds to the first response byte (base)"),
    "first_byte_timeout_per_token": (float, "extra first-byte allowance per prompt token"),
    "idle_timeout": (float, "longest gap between streamed chunks"),
    "request_timeout": (float, "cap for a whole non-streaming response"),
    "max_tries": (int, "tries per request, on different workers"),
    "retry_budget": (float, "retries at most this fraction of requests in flight"),
    "retry_min_concurrency": (int, "retries allowed at once whatever the budget"),
    "pin_ttl": (float, "seconds a session pin lives without use"),
    "health_interval": (float, "seconds between active health checks"),
    "health_timeout": (float, "timeout of one health check"),
    "unhealthy_threshold": (int, "failed checks before a worker is ejected"),
    "healthy_threshold": (int, "passed checks before an ejected worker returns"),
    "eject_consecutive_failures": (int, "consecutive request failures that eject a worker"),
    "eject_base_s": (float, "first ejection time; grows with repeat ejections"),
    "eject_max_s": (float, "longest ejection"),
    "eject_max_fraction": (float, "most of a model's workers ejected at once (one may always go)"),
    "heartbeat_ttl": (float, "agent-registered worker is gone after this long without a heartbeat"),
    "reap_after": (float, "an agent-registered worker silent this long (s) is removed from the registry, "
                          "as POST /nodes/remove would (default 120, 8x the heartbeat TTL; 0: never; never sooner "
                          "than the worker's own TTL); workers "
                          "that never heartbeat (--worker, LMDeploy's own registration) are never reaped"),
    "shutdown_grace": (float, "seconds to finish in-flight requests on SIGTERM"),
    "log_level": (str, "debug, info, warning, error"),
    # issue 10: admission control and the queue
    "admission": (str, "on (default): queue requests for a saturated model; off: forward everything at once"),
    "queue_timeout": (str, "queue budget, s: one number, or per class: interactive=2,default=5,batch=30 (a shorter "
                           "X-Queue-Timeout header wins)"),
    "queue_max": (int, "queued requests per model; 429 beyond"),
    "worker_concurrency": (int, "requests a worker may hold at once (0: learned from TTFT, the default)"),
    "worker_concurrency_initial": (int, "the learned limit's starting value"),
    "worker_concurrency_max": (int, "the learned limit's ceiling"),
    "target_ttft": (float, "a first token slower than this (s) lowers a worker's learned limit"),
    "placement_window": (int, "queued requests a freed worker chooses among (its best prefix match first)"),
    "prefill_backlog_max": (float, "a worker with this many seconds of prefill ahead of a new request (uncached "
                                   "tokens x its learned prefill rate) takes no more (0: off)"),
    "interactive_reserve": (float, "share (0..1) of each worker's limit and prefill backlog that only the "
                                   "interactive class may fill"),
    # issue 12
    "log_format": (str, "auto (text on a terminal, JSON lines otherwise), json or text; logs go to stdout, "
                        "one line per request on the turbofleet.requests logger at info level"),
    "tracing": (str, "OpenTelemetry traces, needs turbofleet[otel]: auto (on when OTEL_EXPORTER_OTLP_ENDPOINT, "
                     "..._TRACES_ENDPOINT or OTEL_TRACES_EXPORTER is set), on, off; the SDK reads OTEL_* itself"),
    # issue 16
    "processes": (str, "event-loop processes on the port (SO_REUSEPORT), or auto (one per core); without "
                       "--registry they share a private redis-server on a Unix socket (docs/BENCHMARKS.md)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `turbofleet proxy`; every one defaults to TURBOFLEET_<NAME> or the built-in default."""
    parser.add_argument("--host", default=None, help="listen address (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=None, help="listen port (default 8000)")
    parser.add_argument("--worker", dest="workers", action="append", default=None, metavar="URL",
                        help="register a worker at start (repeatable)")
    parser.add_argument("--api-keys", nargs="*", default=None, metavar="KEY", help="keys accepted on /v1/*")
    parser.add_argument("--access-log", action="store_true", default=None, help="log every request")
    # security perimeter (issue 11)
    parser.add_argument("--allow-nodes", nargs="+", default=None, metavar="CIDR|HOST",
                        help="addresses that may use the node API and be registered as workers "
                             "(default: loopback and private ranges; link-local is not)")
    parser.add_argument("--insecure-open-admin", action="store_true", default=None,
                        help="LMDeploy's open node API: anyone may register any URL and terminate workers")
    parser.add_argument("--allow-terminate-get", action="store_true", default=None,
                        help="answer GET /nodes/terminate_all as LMDeploy does (default: POST only)")
    parser.add_argument("--forward-client-auth", action="store_true", default=None,
                        help="send the client's Authorization header to workers (default: never)")
    parser.add_argument("--policy-option", dest="policy_options", action="append", default=None,
                        metavar="KEY=VALUE", type=_policy_option,
                        help="an option of the routing policy, e.g. epsilon=0.25 (repeatable; env "
                             "TURBOFLEET_POLICY_OPTIONS as a JSON object)")
    for name, (typ, help_text) in _FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=help_text)


def _coerce(text: str) -> Any:
    """A policy option's value: int, float or bool when it reads as one, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _policy_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), _coerce(value.strip())


def build_settings(args: argparse.Namespace | None, environ: Mapping[str, str]) -> Settings:
    """Merge flags over `TURBOFLEET_*` variables over defaults."""
    values: dict[str, Any] = {}
    fields = Settings.model_fields
    for name, field in fields.items():
        env = environ.get("TURBOFLEET_" + name.upper())
        if env is None:
            continue
        if name == "policy_options":
            try:
                parsed = json.loads(env)
            except ValueError as e:
                raise ValueError(f"TURBOFLEET_POLICY_OPTIONS must be a JSON object: {e}") from e
            if not isinstance(parsed, dict):
                raise ValueError("TURBOFLEET_POLICY_OPTIONS must be a JSON object")
            values[name] = parsed
            continue
        ann = field.annotation
        if name in ("workers", "api_keys", "allow_nodes"):
            values[name] = tuple(x for x in env.replace(",", " ").split() if x)
        elif ann is bool:
            values[name] = env.lower() in ("1", "true", "yes", "on")
        else:
            values[name] = env
    if args is not None:
        for name in fields:
            v = getattr(args, name, None)
            if v is None:
                continue
            if name == "policy_options":  # flags add to (and override) what the environment set
                values[name] = {**values.get(name, {}), **dict(v)}
            else:
                values[name] = tuple(v) if isinstance(v, list) else v
    return Settings(**values)
