"""GPU facts for the registration: device names, count, total and free memory, read through NVML or torch.

Neither is a dependency. `collect()` tries NVML first (`pynvml`, from PyPI's nvidia-ml-py: it reads the driver and
creates no CUDA context), then torch (`torch.cuda.mem_get_info`), and returns {} on any failure (neither installed,
no driver, no GPU). The agent calls `gpu_facts()`, which runs `collect()` in a short-lived subprocess: a torch CUDA
context costs hundreds of MB per device that a long-lived agent would otherwise hold beside the server it supervises,
importing torch takes seconds of CPU, and a hung driver call cannot stall the agent. The subprocess's interpreter
can be another Python (`turbofleet worker --gpu-python`, e.g. LMDeploy's own, which has torch): it runs this very
file by path, so that Python needs no turbofleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("turbofleet.worker.gpu")

_MIB = 1024 * 1024


def collect() -> dict[str, Any]:
    """{"count", "devices": [{"index", "name", "total_mib", "free_mib"}], "total_mib", "free_mib", "source"} or {}.

    `source` says what read them: "nvml" or "torch"."""
    for source, read in (("nvml", _nvml_devices), ("torch", _torch_devices)):
        try:
            devices = read()
        except Exception as e:  # a driver library may fail in any way on a box without a usable GPU
            log.debug("no GPU facts through %s: %r", source, e)
            continue
        if devices:
            return {
                "count": len(devices),
                "devices": devices,
                "total_mib": sum(d["total_mib"] for d in devices),
                "free_mib": sum(d["free_mib"] for d in devices),
                "source": source,
            }
    return {}


def _nvml_devices() -> list[dict[str, Any]]:
    import pynvml

    pynvml.nvmlInit()
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else str(name),  # bytes before nvidia-ml-py 11.5
                    "total_mib": int(mem.total // _MIB),
                    "free_mib": int(mem.free // _MIB),
                }
            )
        return devices
    finally:
        pynvml.nvmlShutdown()


def _torch_devices() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    devices = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        devices.append(
            {
                "index": i,
                "name": str(torch.cuda.get_device_name(i)),
                "total_mib": int(total // _MIB),
                "free_mib": int(free // _MIB),
            }
        )
    return devices


def _probe_code() -> str:
    # run this very file by path: the probe's Python (LMDeploy's, say) need not have turbofleet installed
    path = str(Path(__file__).resolve())
    return f"import json, runpy; print(json.dumps(runpy.run_path({path!r})['collect']()))"


async def gpu_facts(timeout_s: float = 60.0, python: str | None = None) -> dict[str, Any]:
    """`collect()` in a subprocess of `python` (this interpreter by default); {} on any failure or timeout."""
    code = _probe_code()
    try:
        proc = await asyncio.create_subprocess_exec(
            python or sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
    except OSError as e:
        log.warning("could not start the GPU probe: %s", e)
        return {}
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        log.warning("the GPU probe took over %.0f s; registering without GPU facts", timeout_s)
        return {}
    try:
        facts = json.loads(out.decode().strip().splitlines()[-1]) if out.strip() else {}
    except (ValueError, IndexError):
        return {}
    return facts if isinstance(facts, dict) else {}
