"""The api_server the agent launches: its own process group, started, watched and stopped without blocking."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("turbofleet.worker")


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before restart number `attempt` (0-based): base, 2*base, 4*base, ... capped at `cap`."""
    if attempt <= 0:
        return min(base, cap)
    return min(cap, base * (2.0 ** min(attempt, 30)))


class Child:
    """One server process at a time, in a new session so its whole process group can be signalled
    (LMDeploy's PyTorch engine runs helper processes that must not outlive it)."""

    def __init__(self, argv: Sequence[str], pid_file: str | None = None) -> None:
        if not argv:
            raise ValueError("no command to launch")
        self.argv = list(argv)
        self.pid_file = Path(pid_file) if pid_file else None
        self._proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> int:
        """Start the command (stdout/stderr shared with the agent); returns its pid."""
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
        )
        self.starts += 1
        log.info("server started: pid=%d (start #%d): %s", self._proc.pid, self.starts, " ".join(self.argv))
        if self.pid_file is not None:
            tmp = self.pid_file.with_name(self.pid_file.name + ".tmp")
            tmp.write_text(f"{self._proc.pid}\n")
            tmp.replace(self.pid_file)  # atomic: a reader never sees a half-written pid
        return self._proc.pid

    async def wait(self) -> int:
        """Wait for the server to exit; returns its exit status (negative: killed by that signal)."""
        if self._proc is None:
            raise RuntimeError("not started")
        return await self._proc.wait()

    def _signal_group(self, sig: int) -> bool:
        """Signal the server's process group; False when nothing of it is left."""
        if self._proc is None:
            return False
        try:
            os.killpg(self._proc.pid, sig)  # the server leads its own session, so its pgid is its pid
        except (ProcessLookupError, PermissionError):
            return False
        return True

    async def reap(self) -> None:
        """After the server exited on its own: kill what is left of its group (engine helpers holding the GPU
        or the port would block the restart)."""
        self._signal_group(signal.SIGKILL)

    async def stop(self, timeout_s: float) -> int | None:
        """SIGTERM to the group, SIGKILL after `timeout_s` seconds; returns the server's exit status."""
        if self._proc is None:
            return None
        if self._proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), timeout_s)
            except TimeoutError:
                log.warning(
                    "server pid=%d did not exit %.0f s after SIGTERM; sending SIGKILL", self._proc.pid, timeout_s
                )
                self._signal_group(signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._proc.wait(), 10)
        self._signal_group(signal.SIGKILL)  # helpers that ignored SIGTERM
        return self._proc.returncode
