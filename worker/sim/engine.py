"""The simulated inference engine: continuous batching on real wall-clock time, one loop per process.

Each step:
1. admit waiting sequences (FIFO) while fewer than `max_batch` run; admission stops once the step's uncached
   prompt tokens reach `max_prefill_tokens` (at least one sequence is always admitted).  Admission looks the
   prompt up in the prefix cache: cached tokens are skipped by prefill.
2. sleep for ``(uncached_prefill_tokens * prefill_ms_per_token + decode_ms_base + decode_ms_per_seq *
   running) * speed * slow`` milliseconds; steps are scheduled on a deadline so jitter does not accumulate.
   A step whose every sequence left (cancelled, aborted) ends at once, as a real engine's short chunked
   steps would, so a long abandoned prefill never delays the next request.
   With `--gpu-share NAME` (worker/sim/gpushare.py) the step's prefill, cached-token and decode parts are
   each stretched by their slowdown for the number of workers of the group busy now, re-read every
   `SHARE_TICK_S` of a long step (a step's progress is credited at the rate of the moment).
3. the admitted prompts' full blocks enter the cache; every running sequence emits one token (the admitted
   ones their first); sequences that reached `max_tokens` finish and their prompt+output blocks enter the
   cache.

Handlers wait on a sequence with `wait_until(n)`: the engine wakes them once `emitted >= n` or the sequence
finished, so a stream wakes once per token and a non-streaming request only at the end.  A sequence whose
client went away is dropped at once with `cancel()` (from the handler's cancellation) or at the next step
(if its transport is seen closing), and never costs another step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from enum import Enum
from typing import Any

from .cache import PrefixCache, block_hashes
from .config import EngineConfig
from .gpushare import GpuShare, slowdown
from .hitcost import curve_ms
from .stats import REASON_CANCEL, REASON_FINISH, SimStats
from .tokens import VOCAB

log = logging.getLogger("turbofleet.sim.engine")
SHARE_TICK_S = 0.02  # a shared-GPU step re-counts the busy workers this often


class State(Enum):
    WAITING = 1
    RUNNING = 2
    FINISHED = 3


class Seq:
    """One request inside the engine."""

    __slots__ = (
        "cached_tokens",
        "emitted",
        "finish_reason",
        "hashes",
        "id",
        "max_tokens",
        "prompt_len",
        "prompt_tokens",
        "session_id",
        "slow",
        "state",
        "stream",
        "t_arrival",
        "t_first",
        "transport",
        "waiter",
        "wake_at",
        "words",
    )

    def __init__(
        self,
        seq_id: int,
        prompt_tokens: list[str],
        hashes: list[int],
        words: list[int],
        session_id: int = -1,
        stream: bool = False,
        transport: Any = None,
        slow: float = 1.0,
    ) -> None:
        self.id = seq_id
        self.prompt_tokens = prompt_tokens
        self.prompt_len = len(prompt_tokens)
        self.hashes = hashes
        self.words = words
        self.max_tokens = len(words)
        self.session_id = session_id
        self.stream = stream
        self.transport = transport  # checked each step: a closed client stops generation
        self.slow = slow
        self.emitted = 0
        self.cached_tokens = 0
        self.state = State.WAITING
        self.finish_reason: str | None = None
        self.t_arrival = 0.0
        self.t_first: float | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.wake_at = 1 << 62

    @property
    def finished(self) -> bool:
        return self.state is State.FINISHED

    async def wait_until(self, n: int) -> None:
        """Return once at least `n` tokens were emitted or the sequence finished."""
        if self.emitted >= n or self.state is State.FINISHED:
            return
        self.wake_at = n
        fut = asyncio.get_running_loop().create_future()
        self.waiter = fut
        try:
            await fut
        finally:
            self.waiter = None


def _wake(seq: Seq) -> None:
    w = seq.waiter
    if w is not None and not w.done():
        w.set_result(None)


class Engine:
    """Batches sequences and emits their tokens on the configured timing model."""

    def __init__(self, cfg: EngineConfig, cache: PrefixCache, stats: SimStats) -> None:
        self.cfg = cfg
        self.cache = cache
        self.stats = stats
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.slow_all = 1.0  # a `slow` fault without a count
        self._slow_marks: dict[float, int] = {}  # factor -> sequences carrying it (a counted `slow` fault)
        self.sessions: dict[int, Seq] = {}  # explicit session_id (>= 0) -> its active sequence
        self._ids = itertools.count(1)
        self._wakeup = asyncio.Event()
        self._emptied = asyncio.Event()  # set when the last running sequence leaves mid-step
        self._task: asyncio.Task[None] | None = None
        self.share: GpuShare | None = GpuShare(cfg.gpu_share) if cfg.gpu_share else None
        if self.share is not None:
            log.info(
                "sharing a GPU: %s slot %d, slowdown prefill %s cached %s decode %s step %s",
                self.share.path,
                self.share.slot,
                cfg.gpu_slowdown_prefill,
                cfg.gpu_slowdown_cached or cfg.gpu_slowdown_prefill,
                cfg.gpu_slowdown_decode,
                cfg.gpu_slowdown_step or cfg.gpu_slowdown_prefill,
            )

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")

    async def stop(self) -> None:
        """Stop the loop and finish every sequence with reason "abort" so handlers return."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.abort(None)
        if self.share is not None:
            self.share.close()
            self.share = None

    # -- requests --------------------------------------------------------------------------------------------
    def new_seq(
        self,
        prompt_tokens: list[str],
        words: list[int],
        session_id: int = -1,
        stream: bool = False,
        transport: Any = None,
        slow: float = 1.0,
    ) -> Seq:
        hashes = self.cache.hashes(prompt_tokens)
        return Seq(next(self._ids), prompt_tokens, hashes, words, session_id, stream, transport, slow)

    def submit(self, seq: Seq) -> None:
        seq.t_arrival = asyncio.get_running_loop().time()
        self.stats.started += 1
        if seq.session_id >= 0:
            self.sessions[seq.session_id] = seq
        if seq.slow != 1.0:
            self._slow_marks[seq.slow] = self._slow_marks.get(seq.slow, 0) + 1
        if seq.max_tokens <= 0:  # nothing to generate
            self._finish(seq, "length")
            return
        self.waiting.append(seq)
        self._wakeup.set()

    def cancel(self, seq: Seq, detected_at: float | None = None, how: str = "handler_cancelled") -> None:
        """The client went away: drop the sequence now and record how long stopping took."""
        if seq.state is State.FINISHED:
            return
        loop_now = asyncio.get_running_loop().time()
        self._remove(seq)
        seq.finish_reason = "cancelled"
        self.stats.cancelled += 1
        self.stats.success_by_reason[REASON_CANCEL] += 1
        detected = loop_now if detected_at is None else detected_at
        self.stats.recent_cancelled.append(
            {
                "id": seq.id,
                "stream": seq.stream,
                "tokens_emitted": seq.emitted,
                "max_tokens": seq.max_tokens,
                "detected_by": how,
                "stop_delay_ms": round((loop_now - detected) * 1000.0, 3),
                "stopped_at_unix": time.time(),
            }
        )
        _wake(seq)

    def drop(self, seq: Seq) -> None:
        """A fault cut the request off on purpose: stop generating, count it as fault-dropped."""
        if seq.state is State.FINISHED:
            return
        self._remove(seq)
        seq.finish_reason = "fault"
        self.stats.fault_dropped += 1
        _wake(seq)

    def abort(self, session_id: int | None) -> int:
        """Finish sequences of `session_id` (all when None) with reason "abort"; returns how many."""
        victims = [
            s for s in itertools.chain(self.waiting, self.running) if session_id is None or s.session_id == session_id
        ]
        for seq in victims:
            self._remove(seq)
            seq.finish_reason = "abort"
            self.stats.aborted += 1
            self.stats.success_by_reason[REASON_CANCEL] += 1
            _wake(seq)
        return len(victims)

    def _remove(self, seq: Seq) -> None:
        if seq.state is State.WAITING:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        elif seq.state is State.RUNNING:
            with contextlib.suppress(ValueError):
                self.running.remove(seq)
            if not self.running:
                self._emptied.set()
        seq.state = State.FINISHED
        self._release(seq)

    def session_busy(self, session_id: int) -> bool:
        """Whether a request with this explicit session_id is still active (LMDeploy then refuses another)."""
        return session_id >= 0 and session_id in self.sessions

    def _release(self, seq: Seq) -> None:
        if seq.session_id >= 0 and self.sessions.get(seq.session_id) is seq:
            del self.sessions[seq.session_id]
        if seq.slow != 1.0:
            left = self._slow_marks.get(seq.slow, 0) - 1
            if left > 0:
                self._slow_marks[seq.slow] = left
            else:
                self._slow_marks.pop(seq.slow, None)
            seq.slow = 1.0

    # -- observation -----------------------------------------------------------------------------------------
    def kv_usage(self) -> float:
        """Blocks held by running sequences / cache capacity (like vLLM's KV usage), capped at 1."""
        cap = self.cfg.cache_blocks
        if cap <= 0:
            return 0.0
        bs = self.cfg.block_size
        held = sum((s.prompt_len + s.emitted + bs - 1) // bs for s in self.running)
        return min(1.0, held / cap)

    def slow_factor(self) -> float:
        return max(self.slow_all, max(self._slow_marks, default=1.0))

    # -- the loop --------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = 0.0
        while True:
            if not self.waiting and not self.running:
                if self.share is not None:
                    self.share.set_idle()
                self._wakeup.clear()
                await self._wakeup.wait()
                deadline = 0.0  # a fresh start: the idle time is not a step
            now = loop.time()
            # Keep steps on their own clock unless we fell far behind (an overloaded host).
            start = deadline if now - 0.05 < deadline <= now else now
            try:
                admitted, prefill = self._admit()
            except Exception:
                log.exception("engine admission failed")
                admitted, prefill = [], 0
            if not self.running:
                continue
            cfg = self.cfg
            decode_ms = cfg.decode_ms_base + cfg.decode_ms_per_seq * len(self.running)
            prefill_ms = prefill * cfg.prefill_ms_per_token
            if cfg.prefill_ms_per_token_batched >= 0 and len(admitted) > 1:
                longest = max(s.prompt_len - s.cached_tokens for s in admitted)
                prefill_ms = longest * cfg.prefill_ms_per_token + (prefill - longest) * cfg.prefill_ms_per_token_batched
            cached_ms = 0.0
            step_ms = 0.0
            curve = cfg.prefill_cached_ms_curve
            if admitted and (
                cfg.prefill_ms_per_token_ctx or cfg.prefill_ms_step or cfg.prefill_ms_per_cached_token or curve
            ):
                # a fitted profile (issue 14): attention over the context, a prefill step's own cost, cache hits
                ctx = sum((s.prompt_len - s.cached_tokens) * s.prompt_len for s in admitted) / 1000.0
                prefill_ms += cfg.prefill_ms_per_token_ctx * ctx
                step_ms = cfg.prefill_ms_step
                if curve:
                    cached_ms = sum(curve_ms(curve, s.cached_tokens) for s in admitted)
                else:
                    cached_ms = cfg.prefill_ms_per_cached_token * sum(s.cached_tokens for s in admitted)
            scale = cfg.speed * self.slow_factor() / 1000.0
            if self.share is None:
                deadline = start + (prefill_ms + step_ms + cached_ms + decode_ms) * scale
                ended = await self._sleep_until(deadline)
            else:
                deadline, ended = await self._shared_step(
                    start, prefill_ms * scale, cached_ms * scale, decode_ms * scale, step_ms * scale
                )
            if not ended:  # every sequence of this step left: nothing to finish, start afresh
                deadline = 0.0
                continue
            try:
                self._step_done(admitted, loop.time())
            except Exception:
                log.exception("engine step failed")

    async def _sleep_until(self, deadline: float) -> bool:
        """Wait for the step's end; False when every running sequence left first."""
        delay = deadline - asyncio.get_running_loop().time()
        self._emptied.clear()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), delay)
        return bool(self.running)

    def step_factors(self, n_busy: int) -> tuple[float, float, float, float]:
        """The (prefill, cached, decode, prefill step) slowdowns with n_busy workers of the GPU group busy."""
        cfg = self.cfg
        return (
            slowdown(cfg.gpu_slowdown_prefill, n_busy),
            slowdown(cfg.gpu_slowdown_cached or cfg.gpu_slowdown_prefill, n_busy),
            slowdown(cfg.gpu_slowdown_decode, n_busy),
            slowdown(cfg.gpu_slowdown_step or cfg.gpu_slowdown_prefill, n_busy),
        )

    async def _shared_step(self, start: float, p: float, c: float, d: float, s: float = 0.0) -> tuple[float, bool]:
        """Run a step of p + c + d + s seconds (alone) on the shared GPU: every tick, count the busy workers and
        advance the step at that rate. Returns the step's end on the step clock and whether it ended."""
        share = self.share
        assert share is not None
        share.set_busy()
        t = start
        left = 1.0  # the fraction of the step still to run
        while left > 1e-9:
            fp, fc, fd, fs = self.step_factors(share.n_busy())
            need = left * (p * fp + c * fc + d * fd + s * fs)  # seconds to finish at the current rate
            dt = min(need, SHARE_TICK_S)
            t += dt
            if not await self._sleep_until(t):
                return t, False
            left = 0.0 if dt >= need else left * (1.0 - dt / need)
            if left > 1e-9:
                share.set_busy()  # the heartbeat of a long step
        return t, True

    def _admit(self) -> tuple[list[Seq], int]:
        admitted: list[Seq] = []
        prefill = 0
        cfg = self.cfg
        while self.waiting and len(self.running) < cfg.max_batch and (not admitted or prefill < cfg.max_prefill_tokens):
            seq = self.waiting.popleft()
            cached = self.cache.match(seq.hashes, seq.prompt_len)
            seq.cached_tokens = cached
            seq.state = State.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            prefill += seq.prompt_len - cached
            self.stats.prompt_tokens += seq.prompt_len
        return admitted, prefill

    def _step_done(self, admitted: list[Seq], now: float) -> None:
        cache = self.cache
        for seq in admitted:
            if seq.state is State.RUNNING:
                cache.insert(seq.hashes)
        done: list[Seq] = []
        gone: list[Seq] = []
        for seq in self.running:
            tr = seq.transport
            if tr is not None and tr.is_closing():
                gone.append(seq)
                continue
            e = seq.emitted + 1
            seq.emitted = e
            if e == 1:
                seq.t_first = now
                self.stats.ttft.observe(now - seq.t_arrival)
            if e >= seq.max_tokens:
                done.append(seq)
            elif e >= seq.wake_at:
                _wake(seq)
        self.stats.generation_tokens += len(self.running) - len(gone)
        for seq in gone:
            self.cancel(seq, how="transport_closed")
        if done:
            for seq in done:
                self._finish(seq, "length")
            self.running = [s for s in self.running if s.state is State.RUNNING]

    def _finish(self, seq: Seq, reason: str) -> None:
        if self.cache.enabled and seq.emitted:
            # The answer's blocks are cached too, so the next round of a conversation hits them.
            bs = self.cache.block_size
            full = seq.prompt_tokens + [VOCAB[w] for w in seq.words[: seq.emitted]]
            start = len(seq.hashes)
            prev = seq.hashes[-1] if seq.hashes else 0
            self.cache.insert(seq.hashes + block_hashes(full, bs, start, prev))
        seq.state = State.FINISHED
        seq.finish_reason = reason
        self._release(seq)
        self.stats.completed += 1
        self.stats.success_by_reason[REASON_FINISH] += 1
        _wake(seq)
