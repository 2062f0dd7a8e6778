"""The Kubernetes manifests in deploy/k8s: well-formed objects that fit together, and commands that the real
`turbofleet` CLI accepts with the settings it validates. `check_fleet` is shared with test_deploy_helm.py,
which runs it on the rendered chart. No cluster needed: the real `kubectl kustomize`
and kubernetes-validate (scripts/install-deploy-tools.sh installs both) build and validate them.
"""

from __future__ import annotations

import argparse
import base64
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


# ---------------------------------------------------------------------------------------------- tests


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def test_every_manifest_parses_and_the_fleet_fits_together() -> None:
    docs = load_docs(k8s_files())
    check_fleet(docs)
    cluster_scoped = {"Namespace", "PersistentVolume"}
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] not in cluster_scoped} == {"turbofleet"}


def test_kustomization_lists_every_manifest_and_names_the_images() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = {K8S / r for r in kust["resources"]}
    assert all(p.exists() for p in listed)
    assert listed == {p for p in k8s_files() if p.parent == K8S}, "a manifest is missing from kustomization.yaml"
    used = {
        c["image"].split(":")[0]
        for d in load_docs(listed)
        if d["kind"] in WORKLOAD_KINDS
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert {"turbofleet", "turbofleet-worker"} <= used
    assert {i["name"] for i in kust["images"]} == {"turbofleet", "turbofleet-worker"}


def test_redis_has_no_persistence_and_a_bounded_memory() -> None:
    (redis,) = [d for d in load_docs([K8S / "redis.yaml"]) if d["kind"] == "Deployment"]
    c = redis["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    assert flag(args, "--save") == "" and flag(args, "--appendonly") == "no"
    assert flag(args, "--maxmemory-policy") == "volatile-lru"
    assert not any("persistentVolumeClaim" in v for v in redis["spec"]["template"]["spec"].get("volumes", []))


def test_kubectl_kustomize_builds_the_same_objects_and_they_validate(tmp_path: Path) -> None:
    out = run_tool([tool("kubectl"), "kustomize", str(K8S)], timeout=60)
    built = [d for d in yaml.safe_load_all(out) if d]
    (tmp_path / "kustomized.yaml").write_text(out)
    kube_validate([tmp_path / "kustomized.yaml", *sorted((K8S / "optional").glob("*.yaml"))])
    check_fleet(built)
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    expected = {(d["kind"], d["metadata"]["name"]) for d in load_docs(K8S / r for r in kust["resources"])}
    assert {(d["kind"], d["metadata"]["name"]) for d in built} == expected


def test_the_checks_catch_broken_manifests() -> None:
    """The shared checks fail on the mistakes they exist for (so a green run means something)."""
    good = load_docs(k8s_files())

    def broken(edit: Any) -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = yaml.safe_load(yaml.safe_dump(good))
        edit(docs)
        return docs

    def worker_c(docs: list[dict[str, Any]]) -> dict[str, Any]:
        c: dict[str, Any] = _component(docs, "worker")["spec"]["template"]["spec"]["containers"][0]
        return c

    def proxy_c(docs: list[dict[str, Any]]) -> dict[str, Any]:
        c: dict[str, Any] = _component(docs, "proxy")["spec"]["template"]["spec"]["containers"][0]
        return c

    cases = {
        "unknown agent flag": lambda d: worker_c(d)["args"].insert(1, "--no-such-flag"),
        "no POD_IP": lambda d: worker_c(d)["env"].pop(0),
        "short grace": lambda d: _component(d, "worker")["spec"]["template"]["spec"].update(
            terminationGracePeriodSeconds=60
        ),
        "no GPU": lambda d: worker_c(d)["resources"]["limits"].pop("nvidia.com/gpu"),
        "unknown lmdeploy flag": lambda d: worker_c(d)["args"].append("--no-such-lmdeploy-flag"),
        "bad setting": lambda d: _by(d, "ConfigMap")["turbofleet-proxy"]["data"].update(TURBOFLEET_POLCY="x"),
        "bad value": lambda d: _by(d, "ConfigMap")["turbofleet-proxy"]["data"].update(TURBOFLEET_MAX_TRIES="many"),
        "no registry": lambda d: _by(d, "ConfigMap")["turbofleet-proxy"]["data"].pop("TURBOFLEET_REGISTRY"),
        "no readiness": lambda d: proxy_c(d).pop("readinessProbe"),
        "unknown proxy flag": lambda d: proxy_c(d)["args"].append("--workers=2"),
    }
    for name, edit in cases.items():
        with pytest.raises((AssertionError, KeyError, ValueError, StopIteration)):
            check_fleet(broken(edit))
            pytest.fail(f"check_fleet accepted: {name}")


LMDEPLOY = ROOT / ".venv-peers" / "bin" / "lmdeploy"


@pytest.mark.skipif(not LMDEPLOY.exists(), reason="lmdeploy not installed (bench peers venv)")
def test_lmdeploy_flags_still_exist() -> None:
    out = subprocess.run(
        [str(LMDEPLOY), "serve", "api_server", "--help"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    usage = out.split("positional arguments")[0]
    real = set(re.findall(r"\[(--[a-z0-9-]+)", usage))
    assert real >= LMDEPLOY_API_SERVER_FLAGS, LMDEPLOY_API_SERVER_FLAGS - real
