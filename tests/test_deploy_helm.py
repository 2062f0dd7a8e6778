"""The Helm chart in deploy/helm/turbofleet, rendered by the real `helm template` (helm v4, from
scripts/install-deploy-tools.sh), linted by `helm lint --strict`, validated by kubernetes-validate --strict against
the oldest and newest Kubernetes it supports, and held to the same fleet checks as the plain manifests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_kit import (
    CASES,
    CHART,
    DNS_LABEL,
    EXISTING_SECRET,
    EXTERNAL_REDIS,
    KUBE_NEWEST,
    KUBE_OLDEST,
    MODELS,
    REPLICAS_3,
    VALUES,
    check_fleet,
    check_worker,
    flag,
    helm_template,
    kube_validate,
    render,
    run_tool,
    tool,
    workloads,
)

# maps and lists handed whole to toYaml/range/merge: their keys are the user's, not the chart's
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
    "models",
}


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
    assert meta["kubeVersion"] == f">={KUBE_OLDEST}-0", "the oldest version validated is the oldest supported"


@pytest.mark.parametrize("case", sorted(CASES))
def test_helm_lint_strict(case: str) -> None:
    out = run_tool([tool("helm"), "lint", "--strict", str(CHART), "-f", "-"], stdin=json.dumps(CASES[case]))
    assert "0 chart(s) failed" in out


def test_every_rendering_validates_against_the_oldest_and_newest_kubernetes(tmp_path: Path) -> None:
    paths = []
    for case, values in CASES.items():
        for kube in (KUBE_OLDEST, KUBE_NEWEST):
            p = helm_template(values, kube=kube)
            assert p.returncode == 0, f"{case} on {kube}: {p.stderr}"
            paths.append(tmp_path / f"{case}-{kube}.yaml")
            paths[-1].write_text(p.stdout)
    kube_validate(paths)


def test_an_older_kubernetes_is_refused() -> None:
    p = helm_template(kube="1.24.0")
    assert p.returncode != 0 and "kubeVersion" in p.stderr


def test_templates_reference_only_values_that_exist_and_every_value_is_used() -> None:
    text = "\n".join(p.read_text() for p in (CHART / "templates").iterdir())
    # `.Values.a.b`, and `$w.b` where `$w` is `.Values.workers` or a merged copy of it (worker.yaml, NOTES.txt)
    refs = set(re.findall(r"\.Values\.([\w.]+)", text))
    refs |= {f"workers.{rest}" for rest in re.findall(r"\$w\.([\w.]+)", text)}
    refs.discard("workers")
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
    docs, text = render()
    check_fleet(docs)
    objs = kinds(docs)
    assert {k for k, _ in objs} >= {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"}
    assert ("Deployment", "rel-turbofleet-redis") in objs and ("Service", "rel-turbofleet-redis") in objs
    token = base64.b64decode(objs[("Secret", "rel-turbofleet-secrets")]["data"]["TURBOFLEET_ADMIN_TOKEN"]).decode()
    assert len(token) >= 32, "an empty adminToken is replaced by a generated one"
    proxy = objs[("Deployment", "rel-turbofleet-proxy")]
    assert proxy["spec"]["replicas"] == VALUES["proxy"]["replicas"]
    assert "kubectl -n ns port-forward svc/rel-turbofleet-proxy" in text
    assert "GPU workers: 1 x 1 GPU" in text and "Mount the checkpoints" in text


def test_config_checksum_is_the_rendered_configmap() -> None:
    p = helm_template(extra=("--show-only", "templates/configmap.yaml"))
    assert p.returncode == 0, p.stderr
    cm = p.stdout.split("\n", 2)[2]  # helm prints "---" and "# Source: ..." before the template's own text
    docs, _ = render()
    pod = kinds(docs)[("Deployment", "rel-turbofleet-proxy")]["spec"]["template"]
    assert pod["metadata"]["annotations"]["checksum/config"] == hashlib.sha256(cm.encode()).hexdigest()


def test_external_redis() -> None:
    docs, text = render(EXTERNAL_REDIS)
    check_fleet(docs, redis=False)
    objs = kinds(docs)
    assert not any("redis" in name for _, name in objs)
    assert objs[("ConfigMap", "rel-turbofleet-proxy")]["data"]["TURBOFLEET_REGISTRY"] == "redis://redis.infra:6379/3"
    assert "Registry: redis://redis.infra:6379/3" in text


def test_an_external_registry_needs_its_url() -> None:
    p = helm_template({"redis": {"enabled": False}})
    assert p.returncode != 0 and "redis.externalUrl is required" in p.stderr


def test_several_models_with_different_gpu_counts() -> None:
    docs, text = render(MODELS)
    check_fleet(
        docs, gpus={"rel-turbofleet-worker-small": 1, "rel-turbofleet-worker-large": 4, "rel-turbofleet-worker-mid": 2}
    )
    objs = kinds(docs)
    servers = {
        w["metadata"]["name"].rsplit("-", 1)[1]: (w, check_worker(docs, gpus=g, workload=w))
        for w, g in zip(workloads(docs, "worker"), (1, 4, 2), strict=True)
    }
    small, large, mid = (servers[k] for k in ("small", "large", "mid"))
    assert small[0]["spec"]["replicas"] == 2 and large[0]["spec"]["replicas"] == 1
    assert flag(small[1], "--model-name") == "qwen2.5-7b" and small[1][3] == "/models/qwen2.5-7b"
    assert flag(small[1], "--tp") is None and flag(large[1], "--tp") == "4" and flag(mid[1], "--tp") == "2"
    # an entry's list replaces the default list; other entries keep the defaults
    assert flag(large[1], "--session-len") == "32768" and "--enable-prefix-caching" not in large[1]
    assert "--enable-prefix-caching" in small[1] and flag(mid[1], "--backend") == "pytorch"
    assert flag(small[1], "--backend") == "turbomind"
    for w, _ in servers.values():  # every group mounts the shared volume read-only
        vols = w["spec"]["template"]["spec"]["volumes"]
        assert {"name": "models", "persistentVolumeClaim": {"claimName": "ckpts", "readOnly": True}} in vols
    # one PDB per group, selecting that group's pods alone
    for name in ("small", "large", "mid"):
        pdb = objs[("PodDisruptionBudget", f"rel-turbofleet-worker-{name}")]
        assert pdb["spec"]["selector"]["matchLabels"]["turbofleet.io/worker-group"] == name
    assert "GPU workers (large): 1 x 4 GPU, model /models/qwen2.5-72b" in text
    assert "GPU workers (small): 2 x 1 GPU" in text and "Mount the checkpoints" not in text


def test_a_models_entry_needs_an_id() -> None:
    p = helm_template({"workers": {"models": [{"gpus": 2}]}})
    assert p.returncode != 0 and "needs an id" in p.stderr


def test_keys_from_an_existing_secret() -> None:
    docs, text = render(EXISTING_SECRET)
    check_fleet(docs)
    objs = kinds(docs)
    assert not any(k == "Secret" for k, _ in objs), "the chart must not write the user's Secret"
    proxy = objs[("Deployment", "rel-turbofleet-proxy")]["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "my-secrets"}} in proxy["envFrom"]
    worker = objs[("Deployment", "rel-turbofleet-worker")]["spec"]["template"]["spec"]["containers"][0]
    token = next(e for e in worker["env"] if e["name"] == "TURBOFLEET_ADMIN_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "my-secrets", "key": "TURBOFLEET_ADMIN_TOKEN"}
    assert "secret my-secrets" in text


def test_replicas_3() -> None:
    docs, _ = render(REPLICAS_3)
    check_fleet(docs)
    objs = kinds(docs)
    assert objs[("Deployment", "rel-turbofleet-proxy")]["spec"]["replicas"] == 3
    assert objs[("Deployment", "rel-turbofleet-worker")]["spec"]["replicas"] == 3
    assert objs[("Deployment", "rel-turbofleet-redis")]["spec"]["replicas"] == 1, "one registry, whatever the fleet"


def test_main_options_render_and_fit_together() -> None:
    docs, text = render(
        {
            "fullnameOverride": "tf",
            "image": {"repository": "registry.example/turbofleet", "tag": "1.2.3"},
            "auth": {"adminToken": "s3cret", "apiKeys": ["k1", "k2"]},
            **EXTERNAL_REDIS,
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
    proxy = objs[("Deployment", "tf-proxy")]
    assert "replicas" not in proxy["spec"], "the HPA owns the replica count"
    assert objs[("HorizontalPodAutoscaler", "tf-proxy")]["spec"]["scaleTargetRef"]["name"] == "tf-proxy"
    assert proxy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 50
    assert proxy["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/turbofleet:1.2.3"
    assert objs[("ConfigMap", "tf-proxy")]["data"]["TURBOFLEET_PIN_TTL"] == "600"
    secret = objs[("Secret", "tf-secrets")]["data"]
    assert base64.b64decode(secret["TURBOFLEET_API_KEYS"]).decode() == "k1,k2"
    assert base64.b64decode(secret["TURBOFLEET_ADMIN_TOKEN"]).decode() == "s3cret"
    worker = objs[("Deployment", "tf-worker")]
    assert worker["spec"]["replicas"] == 4
    server = check_worker(docs, gpus=2)
    assert flag(server, "--tp") == "2" and server[3] == "/models/m"
    assert flag(worker["spec"]["template"]["spec"]["containers"][0]["args"], "--capacity") == "64"
    env = {e["name"]: e.get("value") for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env.get("HF_HUB_OFFLINE") == "1", "a mounted checkpoint never reaches for a hub"
    assert "Mount the checkpoints" not in text


def test_host_path_and_no_pdbs() -> None:
    docs, _ = render(
        {
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
    assert not any(k == "PodDisruptionBudget" for k, _ in objs)
    worker = objs[("Deployment", "rel-turbofleet-worker")]["spec"]["template"]["spec"]
    assert {"name": "models", "hostPath": {"path": "/data/models", "type": "Directory"}} in worker["volumes"]


def test_workers_can_be_left_out() -> None:
    docs, text = render({"workers": {"enabled": False}})
    check_fleet(docs, workers=False)
    assert not any("worker" in name for _, name in kinds(docs))
    assert "GPU workers" not in text


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
