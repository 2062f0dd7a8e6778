"""deploy/Dockerfile and deploy/Dockerfile.worker, read without a Docker engine: the build context they see
(through their .dockerignore files) holds everything `pip install .` needs, and what they run parses with
the real CLI.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from tests.deploy_kit import cli

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
IMAGES = ("Dockerfile", "Dockerfile.worker")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def arg_default(ins: list[tuple[str, str]], name: str) -> str:
    return next(rest.split("=", 1)[1] for word, rest in ins if word == "ARG" and rest.startswith(name + "="))


def exec_form(ins: list[tuple[str, str]], word: str) -> list[str]:
    (rest,) = [r for w, r in ins if w == word][-1:]
    if word == "HEALTHCHECK":
        rest = rest[rest.index("CMD") + 3 :].strip()
    value = json.loads(rest)
    assert isinstance(value, list), f"{word} should use the exec (JSON) form so signals reach the process"
    return value


def copied_sources(ins: list[tuple[str, str]]) -> list[str]:
    return [s for w, r in ins if w == "COPY" and "--from" not in r for s in r.split()[:-1]]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore syntax: Go filepath.Match per path element, plus `**` for any depth."""
    out, i, pattern = "", 0, pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def included(path: str, ignore: Path) -> bool:
    """Whether `path` (relative to the context) reaches the build, under .dockerignore rules: the last
    matching pattern wins, and a pattern that matches a directory matches everything under it."""
    keep = True
    parents = [path.split("/")[: i + 1] for i in range(path.count("/") + 1)]
    for raw in ignore.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rx = _pattern_regex(line.lstrip("!"))
        if any(rx.match("/".join(p)) for p in parents):
            keep = negate
    return keep


def packages() -> list[str]:
    """The repository folders that pyproject.toml ships (through package-dir, under `turbofleet.`)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dirs = cfg["tool"]["setuptools"]["package-dir"].values()
    return sorted(d for d in dirs if (ROOT / d / "__init__.py").exists())


@pytest.mark.parametrize("name", IMAGES)
def test_the_build_context_holds_what_pip_install_needs_and_nothing_heavy(name: str) -> None:
    ins = instructions(DEPLOY / name)
    ignore = DEPLOY / f"{name}.dockerignore"
    assert ignore.exists(), "BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile"
    sources = copied_sources(ins)
    needed = {"pyproject.toml", "README.md", *packages()}  # README.md: pyproject's `readme`
    assert needed <= set(sources), f"not copied into the image: {needed - set(sources)}"
    for src in sources:
        assert (ROOT / src).exists(), src
        assert included(src, ignore), f"{src} is excluded from the build context"
        for f in (ROOT / src).rglob("*.py") if (ROOT / src).is_dir() else []:
            assert included(str(f.relative_to(ROOT)), ignore), f
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/procs.py", "bench-out/x.png", "proxy/__pycache__/a.pyc"):
        assert not included(heavy, ignore), f"{heavy} would be sent to the builder"


def test_dockerignore_matching_follows_docker_rules() -> None:
    ignore = DEPLOY / "Dockerfile.dockerignore"
    assert included("proxy/app.py", ignore) and included("worker/sim/server.py", ignore)
    assert not included("worker/sim/__pycache__/server.cpython-311.pyc", ignore)
    assert not included("docs/agents/COMMON.md", ignore)


def test_proxy_image_runs_the_proxy_as_a_non_root_user_with_a_health_check() -> None:
    ins = instructions(DEPLOY / "Dockerfile")
    base = arg_default(ins, "PYTHON_IMAGE")
    m = re.match(r"python:(\d+)\.(\d+)", base)
    assert m and (int(m[1]), int(m[2])) >= (3, 11), base
    assert exec_form(ins, "ENTRYPOINT") == ["turbofleet"]
    cmd = exec_form(ins, "CMD")
    args = cli(cmd)
    assert args._module == "turbofleet.proxy.main" and args.host == "0.0.0.0"
    user = [r for w, r in ins if w == "USER"][-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric uid lets Kubernetes check runAsNonRoot"
    check = " ".join(exec_form(ins, "HEALTHCHECK"))
    assert f"127.0.0.1:{args.port}/health" in check
    assert ("EXPOSE", str(args.port)) in ins


def test_worker_image_is_lmdeploy_018_with_the_agent_under_tini() -> None:
    ins = instructions(DEPLOY / "Dockerfile.worker")
    base = arg_default(ins, "LMDEPLOY_IMAGE")
    assert re.match(r"openmmlab/lmdeploy:v0\.18\.\d+-cu\d+", base), base
    assert ("FROM", "${LMDEPLOY_IMAGE}") in ins
    assert exec_form(ins, "ENTRYPOINT") == ["tini", "--", "turbofleet"]
    assert exec_form(ins, "CMD")[0] == "worker"
    run = " ".join(" ".join(r.split()) for w, r in ins if w == "RUN")
    assert "uv venv --python 3.11" in run and re.search(r"apt-get install [^&]*\btini\b", run)
    assert "turbofleet worker --help" in run, "the build proves the agent starts"
    check = " ".join(exec_form(ins, "HEALTHCHECK"))
    assert "127.0.0.1:23333/health" in check and ("EXPOSE", "23333") in ins
