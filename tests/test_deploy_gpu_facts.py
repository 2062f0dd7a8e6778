"""GPU facts as the worker image reads them (issue 13): the agent's subprocess probe runs worker/gpu.py by path in
another Python (`turbofleet worker --gpu-python`, e.g. LMDeploy's /opt/py3/bin/python, which has torch), reading
NVML first and torch second, and falls back to {} cleanly. This box has no GPU, so the drivers' Python faces are
stand-ins the tests control (a `pynvml` and a `torch` module on the probe Python's path); the real nvidia-ml-py,
installed with the test extra, is run too, and must fail cleanly without a driver.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from turbofleet.cli import build_parser
from turbofleet.worker.gpu import gpu_facts
from turbofleet.worker.main import build_config

GIB = 1024**3
FAKE_NVML = """
import os
GIB = 1024**3
_calls = os.environ["FAKE_GPU_CALLS"]
class NVMLError(Exception):
    pass
class _Mem:
    def __init__(self, i):
        self.total, self.free, self.used = 80 * GIB, (10 + i) * GIB, (70 - i) * GIB
def _log(what):
    with open(_calls, "a") as f:
        f.write(what + "\\n")
def nvmlInit():
    if os.environ.get("FAKE_NVML_NO_DRIVER"):
        raise NVMLError("NVML Shared Library Not Found")
    _log("init")
def nvmlShutdown():
    _log("shutdown")
def nvmlDeviceGetCount():
    return 2
def nvmlDeviceGetHandleByIndex(i):
    return i
def nvmlDeviceGetName(h):
    return b"NVIDIA H200" if h == 0 else "NVIDIA H200"  # old bindings answer bytes, new ones str
def nvmlDeviceGetMemoryInfo(h):
    return _Mem(h)
"""
FAKE_TORCH = """
import os
GIB = 1024**3
class cuda:
    @staticmethod
    def is_available():
        with open(os.environ["FAKE_GPU_CALLS"], "a") as f:
            f.write("torch\\n")
        return True
    @staticmethod
    def device_count():
        return 1
    @staticmethod
    def mem_get_info(i):
        return 30 * GIB, 40 * GIB
    @staticmethod
    def get_device_name(i):
        return "NVIDIA A100-SXM4-40GB"
"""


def probe_python(tmp_path: Path, *, nvml: bool, torch: bool, no_driver: bool = False) -> tuple[str, Path]:
    """A Python whose path holds the stand-in modules asked for (like LMDeploy's Python, which has torch)."""
    site = tmp_path / "site"
    site.mkdir()
    if nvml:
        (site / "pynvml.py").write_text(FAKE_NVML)
    if torch:
        (site / "torch").mkdir()
        (site / "torch" / "__init__.py").write_text(FAKE_TORCH)
    calls = tmp_path / "calls"
    calls.touch()
    exe = tmp_path / "python"
    # -S: no site-packages (neither the test's venv nor turbofleet), only the stdlib and the stand-ins
    exe.write_text(
        f"#!/bin/sh\nexport FAKE_GPU_CALLS={calls} PYTHONPATH={site}\n"
        + ("export FAKE_NVML_NO_DRIVER=1\n" if no_driver else "")
        + f'exec {sys.executable} -S "$@"\n'
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(exe), calls


async def test_nvml_first_without_a_cuda_context(tmp_path: Path) -> None:
    exe, calls = probe_python(tmp_path, nvml=True, torch=True)
    facts = await gpu_facts(timeout_s=60, python=exe)
    assert facts == {
        "count": 2,
        "devices": [
            {"index": 0, "name": "NVIDIA H200", "total_mib": 80 * 1024, "free_mib": 10 * 1024},
            {"index": 1, "name": "NVIDIA H200", "total_mib": 80 * 1024, "free_mib": 11 * 1024},
        ],
        "total_mib": 160 * 1024,
        "free_mib": 21 * 1024,
        "source": "nvml",
    }
    assert calls.read_text().split() == ["init", "shutdown"], "NVML is shut down again; torch is never touched"


async def test_torch_when_nvml_has_no_driver(tmp_path: Path) -> None:
    exe, calls = probe_python(tmp_path, nvml=True, torch=True, no_driver=True)
    facts = await gpu_facts(timeout_s=60, python=exe)
    assert facts["source"] == "torch" and facts["count"] == 1
    assert facts["devices"] == [{"index": 0, "name": "NVIDIA A100-SXM4-40GB", "total_mib": 40960, "free_mib": 30720}]
    assert calls.read_text().split() == ["torch"]


async def test_torch_alone_as_in_lmdeploys_python(tmp_path: Path) -> None:
    exe, _ = probe_python(tmp_path, nvml=False, torch=True)
    assert (await gpu_facts(timeout_s=60, python=exe))["source"] == "torch"


async def test_neither_nvml_nor_torch_gives_no_facts(tmp_path: Path) -> None:
    exe, _ = probe_python(tmp_path, nvml=False, torch=False)
    assert await gpu_facts(timeout_s=60, python=exe) == {}


async def test_a_hung_probe_is_killed_and_gives_no_facts(tmp_path: Path) -> None:
    exe = tmp_path / "python"
    exe.write_text("#!/bin/sh\nexec sleep 600\n")
    exe.chmod(0o755)
    assert await gpu_facts(timeout_s=1, python=str(exe)) == {}


async def test_the_real_nvml_bindings_without_a_driver_fall_back_cleanly() -> None:
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py is in the test extra")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:  # a machine with a driver: the facts are real ones
        pynvml.nvmlShutdown()
        facts = await gpu_facts(timeout_s=60)
        assert facts["source"] == "nvml" and facts["count"] >= 1 and facts["total_mib"] > 0
        return
    # here: the real bindings import, nvmlInit fails (no libnvidia-ml), torch is absent from the venv
    assert await gpu_facts(timeout_s=60) == {}


def test_the_agent_takes_the_probe_python_from_its_flag() -> None:
    argv = ["worker", "--proxy", "http://p:8000", "--gpu-python", "/opt/py3/bin/python", "--attach", "http://w:1"]
    cfg = build_config(build_parser("worker").parse_args(argv), {}, detect=False)
    assert cfg.gpu_python == "/opt/py3/bin/python"
    default = build_config(build_parser("worker").parse_args(argv[:3] + argv[5:]), {}, detect=False)
    assert default.gpu_python is None


@pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="no NVIDIA driver on this machine")
async def test_real_gpu_facts_on_a_gpu_machine() -> None:
    facts = await gpu_facts(timeout_s=120)
    assert facts["count"] >= 1 and all(d["total_mib"] > 0 for d in facts["devices"]), facts
