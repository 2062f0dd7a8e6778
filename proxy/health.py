"""Worker health: passive outlier ejection and active health checks.

Ejection is this replica's own judgement (as in Envoy): it is an overlay on the registry's snapshot, kept in
memory, so it works the same with or without Redis and costs no I/O on the request path.

- Passive: `eject_consecutive_failures` failed tries in a row eject a worker for `eject_base_s` × the number
  of times it was ejected, capped at `eject_max_s`. When that time is up the worker is tried again. The
  multiplier shrinks by one for every `eject_base_s` the worker then goes without an ejection, so an old
  incident does not make the next blip expensive.
- Active: every `health_interval` each worker's `/health` is fetched; `unhealthy_threshold` failures in a row
  take it out until `healthy_threshold` passes in a row bring it back. Coming back from a failed state also
  ends a passive ejection (Envoy's successful_active_health_check_uneject_host): the outage is over.
- Never the last: a worker is not ejected when it is the last ready one of any model it serves, and never more
  than `eject_max_fraction` of a model's workers are out at once. A blip never removes a worker for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from turbofleet.balancer.policy import EJECTED, READY, WorkerView

from .config import Settings
from .metrics import Metrics

log = logging.getLogger("turbofleet.health")


@dataclass(slots=True)
class _State:
    consecutive_failures: int = 0
    times_ejected: int = 0
    ejected_until: float = 0.0
    #: set by active checks: out until `healthy_threshold` checks pass
    down: bool = False
    check_failures: int = 0
    check_passes: int = 0
    last_reason: str = ""


class Outliers:
    """Tracks failures per worker and says which workers are out. Synchronous; the clock is injectable."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        snapshot: Callable[[], Sequence[WorkerView]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._snapshot = snapshot
        self._clock = clock
        self._states: dict[str, _State] = {}
        self._out: frozenset[str] = frozenset()
        #: when the earliest passive ejection among those out ends (the out-set must be rebuilt then)
        self._recheck_at = math.inf
        self._applied: tuple[Sequence[WorkerView], frozenset[str], Sequence[WorkerView]] | None = None

    # ---------------------------------------------------------------- passive
    def success(self, worker: str) -> None:
        st = self._states.get(worker)
        if st is not None and st.consecutive_failures:
            st.consecutive_failures = 0

    def failure(self, worker: str, reason: str) -> None:
        st = self._states.setdefault(worker, _State())
        st.consecutive_failures += 1
        st.last_reason = reason
        if st.consecutive_failures < self.settings.eject_consecutive_failures:
            return
        now = self._clock()
        if st.down or st.ejected_until > now or not self._may_eject(worker):
            return
        base = self.settings.eject_base_s
        if st.times_ejected and base > 0:
            # one step back for every base period the worker has been in since its last ejection ended
            calm = int((now - st.ejected_until) // base)
            st.times_ejected = max(0, st.times_ejected - calm)
        st.times_ejected += 1
        span = min(base * st.times_ejected, self.settings.eject_max_s)
        st.ejected_until = now + span
        st.consecutive_failures = 0
        self._refresh()
        self.metrics.inc("turbofleet_ejections_total", cause="passive", reason=reason, worker=worker)
        log.warning(
            "ejected %s for %gs (ejection %d) after repeated failures (%s)", worker, span, st.times_ejected, reason
        )

    # ---------------------------------------------------------------- active
    def check_result(self, worker: str, ok: bool, reason: str = "") -> None:
        st = self._states.setdefault(worker, _State())
        if ok:
            st.check_failures = 0
            st.check_passes += 1
            if st.down and st.check_passes >= self.settings.healthy_threshold:
                st.down = False
                # the outage that failed the checks is over: requests may go there again at once
                st.consecutive_failures = 0
                st.ejected_until = min(st.ejected_until, self._clock())
                self._refresh()
                log.info("worker %s is healthy again", worker)
            return
        st.check_passes = 0
        st.check_failures += 1
        st.last_reason = reason
        if not st.down and st.check_failures >= self.settings.unhealthy_threshold and self._may_eject(worker):
            st.down = True
            self._refresh()
            self.metrics.inc("turbofleet_ejections_total", cause="active", reason=reason, worker=worker)
            log.warning(
                "worker %s failed %d health checks (%s): out until it passes %d",
                worker,
                st.check_failures,
                reason,
                self.settings.healthy_threshold,
            )

    def forget(self, worker: str) -> None:
        if self._states.pop(worker, None) is not None:
            self._refresh()

    def keep_only(self, workers: Sequence[str]) -> None:
        """Drop the state of workers that left the registry (expired heartbeats, another replica's remove)."""
        gone = self._states.keys() - set(workers)
        for w in gone:
            del self._states[w]
        if gone:
            self._refresh()

    # ---------------------------------------------------------------- views
    def _refresh(self) -> None:
        now = self._clock()
        out: list[str] = []
        recheck = math.inf
        for w, st in self._states.items():
            if st.down:
                out.append(w)
            elif st.ejected_until > now:
                out.append(w)
                recheck = min(recheck, st.ejected_until)
        self._out = frozenset(out)
        self._recheck_at = recheck

    def out(self) -> frozenset[str]:
        """Workers out right now. Passive ejections end by time: the set is rebuilt when the first one ends."""
        if self._out and self._clock() >= self._recheck_at:
            self._refresh()
        return self._out

    def state(self, worker: str) -> dict[str, Any]:
        """This replica's health view of one worker (for /nodes/status and tests)."""
        st = self._states.get(worker)
        if st is None:
            return {"out": False}
        left = st.ejected_until - self._clock()
        return {
            "out": worker in self.out(),
            "down": st.down,
            "ejected_for_s": round(max(0.0, left), 3),
            "times_ejected": st.times_ejected,
            "consecutive_failures": st.consecutive_failures,
            "reason": st.last_reason,
        }

    def reason(self, worker: str) -> str:
        st = self._states.get(worker)
        return st.last_reason if st else ""

    def apply(self, views: Sequence[WorkerView]) -> Sequence[WorkerView]:
        """The snapshot as routing should see it: ejected workers marked so."""
        out = self.out()
        if not out:
            return views
        cached = self._applied
        if cached is not None and cached[0] is views and cached[1] is out:
            return cached[2]
        applied = tuple(replace(v, state=EJECTED) if v.id in out and v.state == READY else v for v in views)
        self._applied = (views, out, applied)
        return applied

    def _may_eject(self, worker: str) -> bool:
        """Never eject the last ready worker of a model, nor more than the allowed fraction of one."""
        views = self._snapshot()
        me = next((v for v in views if v.id == worker), None)
        if me is None:
            return True
        out = self.out()
        for model in me.models:
            serving = [v for v in views if model in v.models and v.state == READY]
            ready_left = [v for v in serving if v.id not in out and v.id != worker]
            if not ready_left:
                return False
            out_after = len(serving) - len(ready_left)
            if out_after > max(1, int(self.settings.eject_max_fraction * len(serving))):
                return False
        return True


class HealthChecker:
    """Background loop: GET /health on every registered worker, feeding `Outliers.check_result`."""

    def __init__(
        self, settings: Settings, session: aiohttp.ClientSession, outliers: Outliers, urls: Callable[[], Sequence[str]]
    ) -> None:
        self.settings = settings
        self.session = session
        self.outliers = outliers
        self.urls = urls
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.settings.health_interval > 0:
            self._task = asyncio.create_task(self._loop(), name="turbofleet-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check(self, url: str) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.health_timeout)
        try:
            async with self.session.get(url + "/health", timeout=timeout) as r:
                await r.read()
                ok = r.status == 200
                reason = "" if ok else f"status {r.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            ok, reason = False, type(e).__name__
        self.outliers.check_result(url, ok, reason)

    async def run_once(self) -> None:
        urls = list(self.urls())
        self.outliers.keep_only(urls)
        if urls:
            await asyncio.gather(*(self.check(u) for u in urls))

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # keep checking whatever one round did
                log.exception("health check round failed")
            await asyncio.sleep(self.settings.health_interval)
