"""Helpers for the deploy tests (tests/test_deploy_*.py, tests/test_grafana.py); no tests here.

The deploy tools (scripts/install-deploy-tools.sh puts them in .tools/bin), the checks that a set of Kubernetes
objects makes a fleet that fits together (`check_fleet`, run on the plain manifests and on the rendered chart), and
the Helm chart rendered by the real `helm template` (`render`, `helm_template`, the value sets in `CASES`).
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from turbofleet.cli import build_parser
from turbofleet.proxy.config import Settings, build_settings
from turbofleet.worker.main import _command, build_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
POD_IP = "10.0.0.7"

# `lmdeploy serve api_server` flags that the deploy files may use, checked against lmdeploy 0.18.0's --help
# (test_lmdeploy_flags_still_exist re-checks them wherever lmdeploy is installed).
LMDEPLOY_API_SERVER_FLAGS = frozenset(
    {
        *("--server-name", "--server-port", "--backend", "--model-name", "--enable-prefix-caching"),
        *("--cache-max-entry-count", "--tp", "--session-len", "--max-batch-size", "--api-keys", "--log-level"),
        *("--trust-remote-code", "--quant-policy", "--model-format", "--max-prefill-token-num", "--chat-template"),
        *("--dtype", "--download-dir", "--proxy-url", "--max-concurrent-requests"),
    }
)


TOOLS = ROOT / ".tools" / "bin"
# the Kubernetes versions the manifests and the chart (Chart.yaml kubeVersion) support: both ends are validated
KUBE_OLDEST, KUBE_NEWEST = "1.25.0", "1.37.0"


def tool(name: str) -> str:
    """A deploy tool installed by scripts/install-deploy-tools.sh (scripts/test.sh runs it): never skipped."""
    path = TOOLS / name
    if not path.exists():
        pytest.fail(f"{name} is not installed: run `bash scripts/install-deploy-tools.sh` (scripts/test.sh does)")
    return str(path)


def run_tool(argv: list[str], *, timeout: float = 120, stdin: str | None = None) -> str:
    """Run a tool; its failure fails the test with the tool's own output."""
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=stdin, check=False)
    assert p.returncode == 0, f"`{' '.join(argv)}` exited {p.returncode}:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout


def kube_validate(paths: list[Path]) -> None:
    """kubernetes-validate --strict on every object of `paths`, against the oldest and the newest Kubernetes."""
    for version in (KUBE_OLDEST, KUBE_NEWEST):
        run_tool([tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, *map(str, paths)])


def load_docs(paths: Iterable[Path]) -> list[dict[str, Any]]:
    return [d for p in paths for d in yaml.safe_load_all(p.read_text()) if d]


def cli(argv: list[str]) -> argparse.Namespace:
    """`turbofleet ARGV` parsed by the real CLI parser; a flag that does not exist fails the test."""
    try:
        return build_parser(argv[0]).parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"`turbofleet {' '.join(argv)}` is rejected by the CLI") from e


def turbofleet_argv(container: dict[str, Any]) -> list[str]:
    """The turbofleet arguments of a container (the images' entrypoint is `[tini --] turbofleet`)."""
    argv = [*container.get("command", []), *container.get("args", [])]
    if argv[:2] == ["tini", "--"]:
        argv = argv[2:]
    if argv and argv[0] == "turbofleet":
        argv = argv[1:]
    return [str(a) for a in argv]


def lmdeploy_flags(argv: list[str]) -> set[str]:
    assert argv[:3] == ["lmdeploy", "serve", "api_server"], argv
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def flag(argv: list[str], name: str) -> str | None:
    return next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name), None)


def _by(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _component(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    found = [
        d
        for d in docs
        if d["kind"] in WORKLOAD_KINDS
        and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {component} workload, found {len(found)}"
    return found[0]


def container_env(docs: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str]:
    """The container's environment, resolved from ConfigMaps, Secrets and the downward API."""
    maps, secrets = _by(docs, "ConfigMap"), _by(docs, "Secret")
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            env.update(maps[src["configMapRef"]["name"]]["data"])
        else:
            s = secrets.get(src["secretRef"]["name"])
            if s is not None:  # an existing Secret (helm auth.existingSecret) is not in the manifests
                env.update(_secret_data(s))
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif "fieldRef" in e["valueFrom"]:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            env[e["name"]] = {"status.podIP": POD_IP, "metadata.name": "pod-0"}[path]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = _secret_data(secrets[ref["name"]]).get(ref["key"], "") if ref["name"] in secrets else ""
    return env


def _secret_data(s: dict[str, Any]) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
    data.update(s.get("stringData") or {})
    return data


def _ports(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}


def _probe_port(c: dict[str, Any], probe: dict[str, Any]) -> int:
    port = (probe.get("httpGet") or probe.get("tcpSocket") or {}).get("port")
    assert port is not None, probe
    return _ports(c)[port] if isinstance(port, str) else int(port)


def check_objects(docs: list[dict[str, Any]]) -> None:
    """Every object is named and typed; selectors select; named ports exist; containers are probed."""
    assert docs
    seen = set()
    for d in docs:
        assert d.get("apiVersion") and d.get("kind"), d
        name = d["metadata"]["name"]
        assert DNS_LABEL.match(name) and len(name) <= 63, name
        assert (d["kind"], name) not in seen, f"duplicate {d['kind']}/{name}"
        seen.add((d["kind"], name))
    pods = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
    for w in pods:
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), w["metadata"]["name"]
        for c in w["spec"]["template"]["spec"]["containers"]:
            image = c.get("image", "")
            assert ":" in image and not image.endswith(":latest") and not image.endswith(":"), image
            assert "readinessProbe" in c, f"{w['metadata']['name']}/{c['name']} has no readiness probe"
            for probe in ("readinessProbe", "livenessProbe"):
                if probe in c and "exec" not in c[probe]:
                    _probe_port(c, c[probe])  # a named port must exist
    selectors: tuple[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]], ...] = (
        ("Service", lambda d: d["spec"]["selector"]),
        ("PodDisruptionBudget", lambda d: d["spec"]["selector"]["matchLabels"]),
    )
    for kind, selector_of in selectors:
        for d in docs:
            if d["kind"] != kind:
                continue
            sel = selector_of(d)
            matched = [w for w in pods if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
            assert matched, f"{kind}/{d['metadata']['name']} selects no workload"
            for p in d["spec"].get("ports", []):
                target = p.get("targetPort", p["port"])
                if isinstance(target, str):
                    assert target in _ports(matched[0]["spec"]["template"]["spec"]["containers"][0]), target


def check_proxy(docs: list[dict[str, Any]], *, redis_in_manifests: bool = True) -> Settings:
    """The proxy parses, gets a valid shared-registry configuration, and shuts down within its grace."""
    w = _component(docs, "proxy")
    pod = w["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = cli(turbofleet_argv(c))
    assert args._module == "turbofleet.proxy.main"
    env = container_env(docs, c)
    unknown = {k for k in env if k.startswith("TURBOFLEET_")} - {
        "TURBOFLEET_" + f.upper() for f in Settings.model_fields
    }
    assert not unknown, f"not proxy settings: {unknown}"
    settings = build_settings(args, env)  # pydantic checks every value's type
    assert settings.registry and settings.registry.startswith("redis://"), settings.registry
    host, port = re.match(r"redis://([^:/]+):(\d+)/\d+$", settings.registry).groups()  # type: ignore[union-attr]
    if redis_in_manifests:
        svc = _by(docs, "Service")[host]
        assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
        assert _component(docs, "registry")
    assert settings.replica_id == "pod-0", "each replica needs its own id (the pod name)"
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
        assert _probe_port(c, c[probe]) == settings.port
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["sleep", "0"])
    assert pre_stop[0] == "sleep"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > float(pre_stop[1]) + settings.shutdown_grace, "SIGKILL would cut requests in flight"
    return settings


def workloads(docs: list[dict[str, Any]], component: str) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d["kind"] in WORKLOAD_KINDS
        and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]


def check_worker(docs: list[dict[str, Any]], *, gpus: int = 1, workload: dict[str, Any] | None = None) -> list[str]:
    """A GPU worker group: the agent launches lmdeploy, advertises the pod IP, drains within the grace period."""
    w = workload or _component(docs, "worker")
    pod = w["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = cli(turbofleet_argv(c))
    assert args._module == "turbofleet.worker.main"
    env = container_env(docs, c)
    assert env.get("POD_IP") == POD_IP, "POD_IP must come from the downward API (status.podIP)"
    cfg = build_config(args, env, detect=False)
    server = _command(list(args.command))  # the subcommand's REMAINDER replaces the subcommand name here
    flags = lmdeploy_flags(server)
    assert flags <= LMDEPLOY_API_SERVER_FLAGS, f"unknown lmdeploy flags: {flags - LMDEPLOY_API_SERVER_FLAGS}"
    assert flag(server, "--backend") in (None, "turbomind", "pytorch")
    port = int(flag(server, "--server-port") or 23333)
    assert cfg.advertise_url == f"http://{POD_IP}:{port}"
    assert _ports(c)["api"] == port == _probe_port(c, c["readinessProbe"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "livenessProbe" not in c, "the agent restarts the server; a liveness kill would cut the drain"
    for side in ("requests", "limits"):
        assert int(c["resources"][side]["nvidia.com/gpu"]) == gpus
    assert int(flag(server, "--tp") or 1) == gpus
    assert pod["terminationGracePeriodSeconds"] > cfg.drain_grace + cfg.stop_timeout, "SIGKILL would cut the drain"
    assert env.get("TURBOFLEET_ADMIN_TOKEN") is not None
    proxy_c = _component(docs, "proxy")["spec"]["template"]["spec"]["containers"][0]
    proxy_secret = next(s["secretRef"]["name"] for s in proxy_c["envFrom"] if "secretRef" in s)
    token_ref = next(e for e in c["env"] if e["name"] == "TURBOFLEET_ADMIN_TOKEN")["valueFrom"]["secretKeyRef"]
    assert token_ref["name"] == proxy_secret, "the agents must send the token the proxies check"
    (proxy_url,) = cfg.proxies
    host, proxy_port = re.match(r"http://([^:/]+):(\d+)$", proxy_url).groups()  # type: ignore[union-attr]
    assert int(proxy_port) in [p["port"] for p in _by(docs, "Service")[host]["spec"]["ports"]]
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    assert mounts.get("shm") == "/dev/shm"
    if "models" in mounts:
        assert server[3].startswith(mounts["models"] + "/"), "the model path should be on the model volume"
    return server


def check_fleet(
    docs: list[dict[str, Any]], *, gpus: int | dict[str, int] = 1, workers: bool = True, redis: bool = True
) -> None:
    """`gpus`: the GPUs per worker, or {worker Deployment name: GPUs} for several worker groups (models)."""
    check_objects(docs)
    check_proxy(docs, redis_in_manifests=redis)
    if not workers:
        assert not workloads(docs, "worker")
    elif isinstance(gpus, int):
        check_worker(docs, gpus=gpus)
    else:
        groups = {w["metadata"]["name"]: w for w in workloads(docs, "worker")}
        assert set(groups) == set(gpus), f"worker groups {sorted(groups)}, expected {sorted(gpus)}"
        for name, n in gpus.items():
            check_worker(docs, gpus=n, workload=groups[name])
        selectors = [w["spec"]["selector"]["matchLabels"] for w in groups.values()]
        for i, a in enumerate(selectors):  # a group's selector must not take another group's pods
            for b in selectors[i + 1 :]:
                assert not (a.items() <= b.items() or b.items() <= a.items()), (a, b)


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "turbofleet"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
EXTERNAL_REDIS = {"redis": {"enabled": False, "externalUrl": "redis://redis.infra:6379/3"}}
MODELS = {
    "workers": {
        "modelVolume": {"existingClaim": "ckpts"},
        "models": [
            {"id": "small", "replicas": 2, "model": {"path": "/models/qwen2.5-7b", "name": "qwen2.5-7b"}},
            {
                "id": "large",
                "gpus": 4,
                "model": {"path": "/models/qwen2.5-72b", "name": "qwen2.5-72b"},
                "lmdeployArgs": ["--session-len", "32768"],
            },
            {"id": "mid", "gpus": 2, "backend": "pytorch", "model": {"path": "/models/llama-3-8b", "name": "l3"}},
        ],
    }
}
EXISTING_SECRET = {"auth": {"existingSecret": "my-secrets"}}
REPLICAS_3 = {"proxy": {"replicas": 3}, "workers": {"replicas": 3}}
# every value set the chart is rendered, linted and validated with
CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "external-redis": EXTERNAL_REDIS,
    "models": MODELS,
    "existing-secret": EXISTING_SECRET,
    "replicas-3": REPLICAS_3,
}


def helm_template(
    values: dict[str, Any] | None = None, *, kube: str = KUBE_NEWEST, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    argv = [tool("helm"), "template", "rel", str(CHART), "-n", "ns", "--kube-version", kube, "-f", "-", *extra]
    return subprocess.run(argv, input=json.dumps(values or {}), capture_output=True, text=True, timeout=60)


def render(values: dict[str, Any] | None = None, *, kube: str = KUBE_NEWEST) -> tuple[list[dict[str, Any]], str]:
    """The rendered objects, and NOTES.txt as `helm install --dry-run` prints it."""
    p = helm_template(values, kube=kube)
    assert p.returncode == 0, p.stderr
    docs = [d for d in yaml.safe_load_all(p.stdout) if d]
    return docs, notes(values)


def notes(values: dict[str, Any] | None = None) -> str:
    out = run_tool(
        [tool("helm"), "install", "rel", str(CHART), "-n", "ns", "--dry-run=client", "-f", "-"],
        stdin=json.dumps(values or {}),
    )
    return out.split("NOTES:", 1)[1]
