"""The Helm chart in deploy/helm/turbofleet, rendered without helm (tests/test_deploy_gotemplate.py) and held to
the same checks as the plain manifests: every value it reads exists, every value it offers is used, and the
rendered fleet fits together for the default values and for the main options.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy_gotemplate import TemplateError, render_chart
from tests.test_deploy_manifests import DNS_LABEL, check_fleet, check_worker, flag

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "turbofleet"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
# maps and lists handed whole to toYaml/range: their keys are the user's, not the chart's
OPAQUE = {
    "resources",
    "env",
    "podAnnotations",
    "nodeSelector",
    "tolerations",
    "affinity",
    "imagePullSecrets",
    "apiKeys",
    "lmdeployArgs",
    "agentArgs",
}


def render(overrides: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], str]:
    outputs, r = render_chart(CHART, overrides)
    assert not r.missing, f"templates read values that do not exist: {sorted(set(r.missing))}"
    docs = [
        d for name, text in outputs.items() if not name.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d
    ]
    notes = next(text for name, text in outputs.items() if name.endswith("NOTES.txt"))
    return docs, notes


def kinds(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _leaves(v: Any, prefix: str = "") -> set[str]:
    if isinstance(v, dict) and v and prefix.rsplit(".", 1)[-1] not in OPAQUE:
        return {p for k, x in v.items() for p in _leaves(x, f"{prefix}.{k}" if prefix else k)}
    return {prefix}


def test_chart_metadata() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["name"] == "turbofleet" and DNS_LABEL.match(meta["name"])
    assert re.match(r"^\d+\.\d+\.\d+$", meta["version"]) and meta["appVersion"]
    assert (CHART / "templates" / "NOTES.txt").exists() and (CHART / "templates" / "_helpers.tpl").exists()


def test_templates_reference_only_values_that_exist_and_every_value_is_used() -> None:
    text = "\n".join(p.read_text() for p in (CHART / "templates").iterdir())
    # `.Values.a.b`, and `$w.b` where `$w := .Values.workers` (then `workers` itself is only a prefix)
    refs = set(re.findall(r"\.Values\.([\w.]+)", text))
    for var, base in re.findall(r"(\$\w+) := \.Values\.([\w.]+)", text):
        sub = set(re.findall(re.escape(var) + r"\.([\w.]+)", text))
        if sub:
            refs = (refs - {base}) | {f"{base}.{rest}" for rest in sub}
    for ref in refs:
        node: Any = VALUES
        for part in ref.split("."):
            assert isinstance(node, dict) and part in node, f".Values.{ref} is not in values.yaml"
            node = node[part]

    def used(leaf: str) -> bool:  # read itself, inside something read whole, or one of its opaque parts
        return any(r == leaf or leaf.startswith(r + ".") or r.startswith(leaf + ".") for r in refs)

    unused = {leaf for leaf in _leaves(VALUES) if not used(leaf)}
    assert not unused, f"values.yaml offers settings no template reads: {sorted(unused)}"


def test_default_values_render_a_fleet_that_fits_together() -> None:
    docs, notes = render()
    check_fleet(docs)
    objs = kinds(docs)
    assert {k for k, _ in objs} == {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"}
    assert ("Deployment", "rel-turbofleet-redis") in objs and ("Service", "rel-turbofleet-redis") in objs
    token = base64.b64decode(objs[("Secret", "rel-turbofleet-secrets")]["data"]["TURBOFLEET_ADMIN_TOKEN"]).decode()
    assert len(token) >= 32, "an empty adminToken is replaced by a generated one"
    proxy = objs[("Deployment", "rel-turbofleet-proxy")]
    assert proxy["spec"]["replicas"] == VALUES["proxy"]["replicas"]
    assert "kubectl -n ns port-forward svc/rel-turbofleet-proxy" in notes


def test_config_checksum_is_the_rendered_configmap() -> None:
    outputs, _ = render_chart(CHART)
    cm = outputs["turbofleet/templates/configmap.yaml"]
    docs, _ = render()
    pod = kinds(docs)[("Deployment", "rel-turbofleet-proxy")]["spec"]["template"]
    assert pod["metadata"]["annotations"]["checksum/config"] == hashlib.sha256(cm.encode()).hexdigest()


def test_main_options_render_and_fit_together() -> None:
    docs, notes = render(
        {
            "fullnameOverride": "tf",
            "image": {"repository": "registry.example/turbofleet", "tag": "1.2.3"},
            "auth": {"adminToken": "s3cret", "apiKeys": ["k1", "k2"]},
            "redis": {"enabled": False, "externalUrl": "redis://redis.infra:6379/3"},
            "proxy": {"autoscaling": {"enabled": True}, "env": {"TURBOFLEET_PIN_TTL": 600}, "shutdownGrace": 50},
            "workers": {
                "replicas": 4,
                "gpus": 2,
                "model": {"path": "/models/m"},
                "modelVolume": {"existingClaim": "ckpts"},
                "agentArgs": ["--capacity", "64"],
            },
        }
    )
    check_fleet(docs, gpus=2, redis=False)
    objs = kinds(docs)
    assert ("Deployment", "tf-redis") not in objs
    proxy = objs[("Deployment", "tf-proxy")]
    assert "replicas" not in proxy["spec"], "the HPA owns the replica count"
    assert objs[("HorizontalPodAutoscaler", "tf-proxy")]["spec"]["scaleTargetRef"]["name"] == "tf-proxy"
    assert proxy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 50
    assert proxy["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/turbofleet:1.2.3"
    cm = objs[("ConfigMap", "tf-proxy")]["data"]
    assert cm["TURBOFLEET_REGISTRY"] == "redis://redis.infra:6379/3" and cm["TURBOFLEET_PIN_TTL"] == "600"
    secret = objs[("Secret", "tf-secrets")]["data"]
    assert base64.b64decode(secret["TURBOFLEET_API_KEYS"]).decode() == "k1,k2"
    worker = objs[("Deployment", "tf-worker")]
    assert worker["spec"]["replicas"] == 4
    server = check_worker(docs, gpus=2)
    assert flag(server, "--tp") == "2" and server[3] == "/models/m"
    agent = worker["spec"]["template"]["spec"]["containers"][0]["args"]
    assert flag(agent, "--capacity") == "64"
    volumes = worker["spec"]["template"]["spec"]["volumes"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "ckpts", "readOnly": True}} in volumes
    env = {e["name"]: e.get("value") for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env.get("HF_HUB_OFFLINE") == "1", "a mounted checkpoint never reaches for a hub"
    assert "Mount the checkpoints" not in notes


def test_existing_secret_and_host_path_and_no_pdbs() -> None:
    docs, notes = render(
        {
            "auth": {"existingSecret": "my-secrets"},
            "proxy": {"pdb": {"enabled": False}},
            "workers": {
                "pdb": {"enabled": False},
                "modelVolume": {"hostPath": "/data/models"},
                "model": {"path": "/models/qwen"},
            },
        }
    )
    check_fleet(docs)
    objs = kinds(docs)
    assert not any(k == "Secret" for k, _ in objs) and not any(k == "PodDisruptionBudget" for k, _ in objs)
    worker = objs[("Deployment", "rel-turbofleet-worker")]["spec"]["template"]["spec"]
    assert {"name": "models", "hostPath": {"path": "/data/models", "type": "Directory"}} in worker["volumes"]
    assert "secret my-secrets" in notes


def test_workers_can_be_left_out() -> None:
    docs, notes = render({"workers": {"enabled": False}})
    check_fleet(docs, workers=False)
    assert not any("worker" in name for _, name in kinds(docs))
    assert "GPU workers" not in notes


def test_an_external_registry_needs_its_url() -> None:
    with pytest.raises(TemplateError, match=r"redis\.externalUrl is required"):
        render_chart(CHART, {"redis": {"enabled": False}})


def test_a_new_admin_token_rolls_proxies_and_agents() -> None:
    def sums(token: str) -> list[str]:
        docs, _ = render({"auth": {"adminToken": token}})
        pods = [
            d["spec"]["template"] for d in docs if d["kind"] == "Deployment" and "redis" not in d["metadata"]["name"]
        ]
        return [p["metadata"]["annotations"]["checksum/auth"] for p in pods]

    first, again, other = sums("a" * 40), sums("a" * 40), sums("b" * 40)
    assert len(first) == 2 and first == again
    assert all(x != y for x, y in zip(first, other, strict=True))
