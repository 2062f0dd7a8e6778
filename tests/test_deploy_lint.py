"""hadolint on both Dockerfiles and checkov on the plain manifests, the rendered chart and the Dockerfiles (tools from
scripts/install-deploy-tools.sh). A finding is fixed, or its rule is skipped with a one-line reason: in
deploy/.checkov.yaml for every object, or beside the object (checkov.io/skipN annotations, `# checkov:skip=`,
`# hadolint ignore=` comments). Each run carries a canary with a known defect, so a tool that checks nothing fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.deploy_kit import CASES, K8S, ROOT, helm_template, run_tool, tool

DEPLOY = ROOT / "deploy"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.worker"]
CANARY_POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: canary
spec:
  containers:
    - name: c
      image: busybox:1.36
      securityContext:
        privileged: true
"""


def test_hadolint_passes_both_dockerfiles_and_catches_a_canary(tmp_path: Path) -> None:
    run_tool([tool("hadolint"), *map(str, DOCKERFILES)])
    canary = tmp_path / "Dockerfile"
    canary.write_text("FROM debian:bookworm\nRUN apt-get update && apt-get install -y curl\n")
    p = subprocess.run([tool("hadolint"), str(canary)], capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode != 0 and "DL3008" in p.stdout and "DL3015" in p.stdout, p.stdout


def test_checkov_passes_manifests_chart_and_dockerfiles(tmp_path: Path) -> None:
    files = [tmp_path / "kustomized.yaml", *sorted((K8S / "optional").glob("*.yaml")), *DOCKERFILES]
    files[0].write_text(run_tool([tool("kubectl"), "kustomize", str(K8S)]))
    for case, values in CASES.items():
        p = helm_template(values)
        assert p.returncode == 0, p.stderr
        files.append(tmp_path / f"chart-{case}.yaml")
        files[-1].write_text(p.stdout)
    canary = tmp_path / "canary.yaml"
    canary.write_text(CANARY_POD)
    argv = [tool("checkov"), "--config-file", str(DEPLOY / ".checkov.yaml"), "--framework", "kubernetes", "dockerfile"]
    argv += [a for f in [*files, canary] for a in ("-f", str(f))] + ["-o", "json"]
    # checkov asks its vendor's API for guidelines and PyPI for updates unless told not to; with a network namespace
    # of its own (root has unshare) it can reach nothing at all
    if os.geteuid() == 0 and shutil.which("unshare"):
        argv = ["unshare", "--net", *argv]
    env = {**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "BC_SKIP_MAPPING": "TRUE"}
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, check=False)
    reports: Any = json.loads(p.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {r["check_type"]: r for r in reports}
    assert set(by_type) == {"kubernetes", "dockerfile"}, p.stderr[-2000:]
    failed = [
        (f["check_id"], Path(f["file_path"]).name, f["resource"])
        for r in reports
        for f in r["results"]["failed_checks"]
    ]
    assert {name for _, name, _ in failed} == {"canary.yaml"}, f"checkov findings: {failed}"
    assert ("CKV_K8S_16", "canary.yaml", "Pod.default.canary") in failed, "the privileged canary went unnoticed"
    assert by_type["kubernetes"]["summary"]["resource_count"] > 10 and by_type["dockerfile"]["summary"]["passed"] > 0
    assert not any(r["summary"]["parsing_errors"] for r in reports)
