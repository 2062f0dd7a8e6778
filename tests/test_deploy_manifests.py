"""The Kubernetes manifests in deploy/k8s: well-formed objects that fit together, and commands that the real
`turbofleet` CLI accepts with the settings it validates. `check_fleet` is shared with test_deploy_helm.py,
which runs it on the rendered chart. No cluster needed: the real `kubectl kustomize`
and kubernetes-validate (scripts/install-deploy-tools.sh installs both) build and validate them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_kit import (
    K8S,
    LMDEPLOY_API_SERVER_FLAGS,
    ROOT,
    WORKLOAD_KINDS,
    _by,
    _component,
    check_fleet,
    flag,
    k8s_files,
    kube_validate,
    load_docs,
    run_tool,
    tool,
)


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
