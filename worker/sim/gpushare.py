"""Sim workers that time-share one GPU (issue 14): `turbofleet sim-worker --gpu-share NAME`.

The real rig the sim is fitted to runs four TurboMind api_servers on ONE GPU; each is slower while the others
are busy, by how many of them are (docs/GPU.md, "Sim against real"). Sim workers started with the same
`--gpu-share NAME` share a small file (/dev/shm/turbofleet-gpu-NAME, or a path): one slot per worker holding
its pid and, while it runs a step, a heartbeat (CLOCK_MONOTONIC seconds, system-wide on Linux). A worker
counts the slots busy now (itself included) and stretches its step by `slowdown(table, n_busy)`.

Cheap on purpose (4 sims and a proxy share a 2-core box): marking busy and counting are plain reads and
writes of a mapped 512-byte page, no syscalls and no locks; the file lock is taken only to claim or free a
slot (join and leave), never across an await. A worker that dies leaves nothing busy for long: a busy slot
whose heartbeat is older than `stale_s` counts as idle, and a dead pid's slot is free to claim.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

SLOTS = 32
_SLOT = struct.Struct("<qd")  # pid (0 = free), busy heartbeat (0.0 = idle)
SIZE = SLOTS * _SLOT.size
#: environment variable bench's fleets set for their sim workers: the group to join when the profile asks
ENV_GROUP = "TURBOFLEET_SIM_GPU_GROUP"


def slowdown(table: Sequence[float], n_busy: int) -> float:
    """The factor for `n_busy` workers busy (table[0] = one alone, usually 1.0); past the table's end its
    last entry; 1.0 for an empty table or n_busy < 1."""
    if not table or n_busy < 1:
        return 1.0
    return float(table[min(n_busy, len(table)) - 1])


def parse_table(text: str) -> tuple[float, ...]:
    """'1,2.1,3.2,3.75' -> (1.0, 2.1, 3.2, 3.75): the factor with 1, 2, 3, 4 workers busy; raises ValueError
    on an empty table or a factor that is not > 0."""
    out = tuple(float(x) for x in text.split(",") if x.strip())
    if not out or any(not (v > 0) for v in out):
        raise ValueError(f"slowdown table {text!r}: give comma-separated factors > 0, one per busy count")
    return out


def group_path(name: str) -> Path:
    """A name -> /dev/shm/turbofleet-gpu-NAME (the temp dir where there is no /dev/shm); a path as given."""
    if "/" in name:
        return Path(name)
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"turbofleet-gpu-{name}"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class GpuShare:
    """This process's slot in a GPU group. `set_busy()` at a step's start (and as a heartbeat while it runs),
    `set_idle()` when the engine has nothing to run, `n_busy()` to count; `close()` frees the slot."""

    def __init__(self, name: str, stale_s: float = 2.0, pid: int | None = None) -> None:
        self.path = group_path(name)
        self.stale_s = stale_s
        self.pid = os.getpid() if pid is None else pid
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink > 0:  # not unlinked by the last worker leaving meanwhile
                break
            os.close(fd)
        try:
            if os.fstat(fd).st_size < SIZE:
                os.ftruncate(fd, SIZE)
            self._mm = mmap.mmap(fd, SIZE)
            self.slot = self._claim()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        self._fd = fd
        self._off = self.slot * _SLOT.size
        self._busy = False

    def _claim(self) -> int:
        for i in range(SLOTS):
            pid, _ = _SLOT.unpack_from(self._mm, i * _SLOT.size)
            if pid == 0 or not _alive(pid):  # free, or its worker died without leaving
                _SLOT.pack_into(self._mm, i * _SLOT.size, self.pid, 0.0)
                return i
        raise RuntimeError(f"GPU group {self.path}: all {SLOTS} slots are held by live processes")

    def set_busy(self, now: float | None = None) -> None:
        _SLOT.pack_into(self._mm, self._off, self.pid, time.monotonic() if now is None else now)
        self._busy = True

    def set_idle(self) -> None:
        if self._busy:
            _SLOT.pack_into(self._mm, self._off, self.pid, 0.0)
            self._busy = False

    def n_busy(self, now: float | None = None) -> int:
        """Workers of the group running a step now (this one included when it is): busy slots whose heartbeat
        is fresher than stale_s."""
        t = time.monotonic() if now is None else now
        horizon = t - self.stale_s
        return sum(1 for pid, beat in _SLOT.iter_unpack(self._mm) if pid and beat > horizon)

    def close(self) -> None:
        """Free the slot; the last worker to leave removes the file."""
        if self._mm.closed:
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            _SLOT.pack_into(self._mm, self._off, 0, 0.0)
            if not any(pid and _alive(pid) for pid, _ in _SLOT.iter_unpack(self._mm)):
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            self._mm.close()
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
