"""The simulator's settings, built once from the command line and passed down frozen."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineConfig:
    """Timing model and cache geometry.  Defaults: a small GPU whose prefix cache clearly matters.

    A 2,000-token uncached prompt costs 2000 * 0.2 = 400 ms of prefill; a decode step of 32 sequences costs
    10 + 32 * 0.3 = 19.6 ms (about 50 tokens/s per sequence).  The cache holds 1024 blocks of 64 tokens
    (65,536 tokens), so a fleet that scatters conversations evicts what an affinity-aware one keeps.
    """

    max_batch: int = 32
    prefill_ms_per_token: float = 0.2
    decode_ms_base: float = 10.0
    decode_ms_per_seq: float = 0.3
    max_prefill_tokens: int = 8192  # uncached prompt tokens admitted per step (at least one sequence)
    speed: float = 1.0  # multiplies every simulated duration (0.1 = ten times faster)
    block_size: int = 64
    cache_blocks: int = 1024
    prefix_cache: bool = True
    # issue 14 (fitted profiles, worker/sim/profiles/): attention makes a token of prefill dearer the longer
    # its context; this adds per uncached token, per 1,000 tokens of the whole prompt, this many ms
    prefill_ms_per_token_ctx: float = 0.0
    # a step that prefills anything costs this much more (launches, the prefill's own kernels)
    prefill_ms_step: float = 0.0
    # a cache hit is not free on TurboMind: each cached prompt token of an admitted prompt costs this many ms
    prefill_ms_per_cached_token: float = 0.0
    # or a curve of the hit's cached tokens (worker/sim/hitcost.py): ((tokens, ms), ...) knots through (0, 0);
    # when given, it replaces prefill_ms_per_cached_token
    prefill_cached_ms_curve: tuple[tuple[float, float], ...] = ()
    # batched prefill (TurboMind runs several prompts of one step far cheaper than one after another): the
    # uncached tokens of a step's prompts other than its longest cost this many ms each; < 0: the same as
    # prefill_ms_per_token
    prefill_ms_per_token_batched: float = -1.0
    # sim workers time-sharing one GPU (issue 14, worker/sim/gpushare.py): the group (a name or a path) and
    # the factor each part of a step is stretched by with 1, 2, ... workers of the group busy at once
    gpu_share: str | None = None
    gpu_slowdown_prefill: tuple[float, ...] = ()  # uncached tokens, their attention
    gpu_slowdown_cached: tuple[float, ...] = ()  # the cached-token cost of a hit
    gpu_slowdown_decode: tuple[float, ...] = ()  # decode_ms_base + decode_ms_per_seq * running
    gpu_slowdown_step: tuple[float, ...] = ()  # a prefill step's own cost (prefill_ms_step); () = the prefill table


@dataclass(frozen=True)
class SimConfig:
    """Everything `turbofleet sim-worker` was asked to be."""

    model: str = "sim-model"
    host: str = "127.0.0.1"
    port: int = 23333
    engine: EngineConfig = field(default_factory=EngineConfig)
    default_max_tokens: int = 128
    instant: bool = False
    instant_tokens: int = 16
    proxy_url: str | None = None
    advertise_url: str | None = None
    admin_port: int | None = None
    faults: tuple[str, ...] = ()
    api_keys: tuple[str, ...] = ()
    recent_cancelled: int = 100  # how many recent cancellations /sim/stats lists
    register_attempts: int = 20
    register_interval_s: float = 0.5
