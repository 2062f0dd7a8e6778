"""One installed namespace: the wheel installs only `turbofleet` (proxy, worker, balancer and bench beneath it),
so it can sit beside PyPI packages named `proxy` or `bench`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: building a wheel, a venv and a pip install take minutes on a loaded 2-core box
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("turbofleet-*.whl")
    return whl


def test_the_wheel_installs_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"turbofleet"}
    for room in ("proxy/relay.py", "worker/agent.py", "balancer/kv_aware.py", "bench/main.py", "worker/sim/engine.py",
                 "proxy/registry/redis.py"):
        assert f"turbofleet/{room}" in names


def test_no_module_imports_a_room_by_its_bare_name() -> None:
    import re

    bare = re.compile(r"^\s*(from|import) (proxy|worker|balancer|bench)(\.|\s|$)", re.M)
    offenders = [str(p.relative_to(ROOT)) for d in ("proxy", "worker", "balancer", "bench", "turbofleet", "tests")
                 for p in (ROOT / d).rglob("*.py") if bare.search(p.read_text())]
    assert offenders == []


def test_the_wheel_works_in_a_fresh_venv_beside_pypis_proxy_package(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", str(wheel), "proxy"], check=True, capture_output=True,
                   timeout=300)
    shown = subprocess.run([py, "-m", "pip", "show", "proxy", "turbofleet"], check=True, capture_output=True,
                           text=True, timeout=60).stdout
    assert "Name: proxy" in shown and "Name: turbofleet" in shown
    code = ("import turbofleet.proxy.app, turbofleet.worker.sim.server, turbofleet.bench.main, "
            "turbofleet.balancer.kv_aware, turbofleet.proxy.fleetview as fv, pathlib; "
            "assert b'/admin/fleet' in fv._static('status.js'); "
            "print(pathlib.Path(turbofleet.proxy.app.__file__).parent.parent)")
    where = subprocess.run([py, "-c", code], check=True, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert where.stdout.strip().endswith("site-packages/turbofleet")
    helped = subprocess.run([str(venv / "bin" / "turbofleet"), "proxy", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert helped.returncode == 0 and "--policy" in helped.stdout


def test_the_wheel_ships_the_dashboard(wheel: Path) -> None:
    """Issue 12: /status is static files in the package (package-data), byte for byte the checkout's."""
    with zipfile.ZipFile(wheel) as z:
        for name in ("status.html", "status.css", "status.js"):
            assert z.read(f"turbofleet/proxy/static/{name}") == (ROOT / "proxy" / "static" / name).read_bytes()


def test_the_embedded_default_needs_no_redis_package(tmp_path: Path) -> None:
    """redis-py is imported only with `--registry redis://`: the proxy must build its app (every module the
    default imports) with `redis` unimportable, as on a GPU host whose Python has only aiohttp (a GPU run found
    a top-level import that broke this)."""
    code = ("import sys; sys.modules['redis'] = None\n"
            "from turbofleet.proxy.app import build_app\n"
            "from turbofleet.proxy.config import Settings\n"
            "build_app(Settings()); print('built')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and "built" in out.stdout, out.stderr[-2000:]
