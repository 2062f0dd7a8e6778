"""Microseconds per routing decision, per policy, at 10 / 100 / 1,000 workers.

    python -m turbofleet.bench.microbench_decision [--sizes 10,100,1000] [--decisions 2000] [--seed 1]

Requests are realistic chat traffic: a shared system prompt (~4k chars), then a per-session document and
history (2k-12k chars), so prompts are 20-60 blocks. kv_aware runs on a warm index (every session has been
routed and observed a few times) with a mix of pinned follow-ups (60%), new sessions (20%) and session-less
requests (20%). Loads vary between a few pre-built snapshots. `choose` is the policy alone on the eligible
workers; `route` adds the model/readiness filter, i.e. what the proxy pays per request.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence

from turbofleet.balancer import (
    POLICIES,
    Outcome,
    Policy,
    RouteRequest,
    WorkerView,
    block_hashes,
    eligible,
    make_policy,
    route,
)

MODEL = "model"


def _corpus(rng: random.Random, chars: int) -> str:
    """Random words; slices at different offsets make distinct documents cheaply."""
    pool = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(4000)]
    return " ".join(rng.choices(pool, k=chars // 6 + 1))[:chars]


def fleet(n: int, rng: random.Random, snapshots: int = 8) -> list[list[WorkerView]]:
    """`snapshots` views of the same n workers with different loads (about 8 in flight on average)."""
    ids = [f"http://10.0.{i // 250}.{i % 250 + 1}:23333" for i in range(n)]
    models = frozenset({MODEL})
    return [
        [WorkerView(id=i, models=models, in_flight=rng.randint(0, 16), waiting=rng.randint(0, 1)) for i in ids]
        for _ in range(snapshots)
    ]


def requests(n_workers: int, rng: random.Random, count: int) -> list[RouteRequest]:
    """A mix of pinned follow-ups, new sessions and session-less requests over a shared system prompt."""
    corpus = _corpus(rng, 1_000_000)
    system = corpus[:4000]
    sessions = max(2 * n_workers, 50)
    docs = []
    for _ in range(sessions):
        start = rng.randrange(4000, len(corpus) - 12000)
        docs.append(system + corpus[start : start + rng.randint(2000, 12000)])
    out: list[RouteRequest] = []
    for k in range(count):
        s = rng.randrange(sessions)
        start = rng.randrange(len(corpus) - 600)
        text = docs[s] + corpus[start : start + rng.randint(100, 600)]
        hashes = block_hashes(text)
        tokens = len(text) // 5
        kind = rng.random()
        if kind < 0.6:
            w = s % n_workers
            pin = f"http://10.0.{w // 250}.{w % 250 + 1}:23333"
            out.append(RouteRequest(MODEL, f"s{s}", hashes, pinned_worker=pin, prompt_tokens=tokens))
        elif kind < 0.8:
            out.append(RouteRequest(MODEL, f"new{k}", hashes, prompt_tokens=tokens))
        else:
            out.append(RouteRequest(MODEL, None, hashes, prompt_tokens=tokens))
    return out


def warm(policy: Policy, reqs: Sequence[RouteRequest], snapshot: list[WorkerView]) -> None:
    """Route and observe every request once, so the prefix index and latency histories are populated."""
    for r in reqs:
        d = policy.choose(r, snapshot)
        tokens = r.prompt_tokens
        # the worker confirms what the index predicted (~51 tokens per 256-char block)
        cached = min(tokens, d.matched_blocks * tokens // max(len(r.prefix_hashes), 1))
        policy.observe(Outcome(d.worker_id, r.prefix_hashes, True, 1.0, 0.1, tokens, cached))


def time_per_call(
    policy: Policy, reqs: Sequence[RouteRequest], snaps: list[list[WorkerView]], full: bool, cold: bool
) -> tuple[float, float]:
    """(median, mean) µs per decision: `route` on the full snapshot when `full`, else `choose` on the
    eligible workers. The median is the figure to read on a shared machine: the mean takes every time the
    process was descheduled mid-decision.

    Unless `cold`, each snapshot is read once (untimed) just before the decision, because the proxy's
    registry builds its snapshot right before routing, so its views are hot in the CPU cache. A cold
    snapshot (views evicted by other work in between) costs 2-3x more at 1,000 workers.
    """
    ready = [eligible(MODEL, s) for s in snaps]
    k = len(snaps)
    clock = time.perf_counter
    spent: list[float] = []
    for i, r in enumerate(reqs):
        snap = snaps[i % k]
        if not cold:
            for w in snap:
                w.in_flight  # noqa: B018 - a read, to bring the view into the cache
        if full:
            start = clock()
            route(policy, r, snap)
            spent.append(clock() - start)
            continue
        else:
            workers = ready[i % k]
            start = clock()
            policy.choose(r, workers)
        spent.append(clock() - start)
    return statistics.median(spent) * 1e6, statistics.fmean(spent) * 1e6


def hash_costs(rng: random.Random) -> dict[int, float]:
    """µs per `block_hashes` call by prompt size in characters."""
    out: dict[int, float] = {}
    corpus = _corpus(rng, 100_000)
    for size in (2_000, 20_000, 100_000):
        text = corpus[:size]
        reps = max(20, 2_000_000 // size)
        start = time.perf_counter()
        for _ in range(reps):
            block_hashes(text)
        out[size] = (time.perf_counter() - start) / reps * 1e6
    return out


Timing = tuple[float, float, float, float]


def run(sizes: Sequence[int], decisions: int, seed: int, cold: bool = False) -> dict[tuple[str, int], Timing]:
    """{(policy, workers): (choose median, route median, choose mean, route mean)} in µs."""
    results: dict[tuple[str, int], Timing] = {}
    for n in sizes:
        rng = random.Random(seed + n)
        snaps = fleet(n, rng)
        reqs = requests(n, rng, decisions)
        warmup = requests(n, random.Random(seed), min(decisions, 4 * n + 200))
        for name in POLICIES:
            options = {"seed": seed} if name in ("random", "min_expected_latency") else {}
            policy = make_policy(name, **options)
            warm(policy, warmup, snaps[0])
            warm(policy, reqs[: len(reqs) // 4], snaps[1])
            choose_med, choose_mean = time_per_call(policy, reqs, snaps, full=False, cold=cold)
            route_med, route_mean = time_per_call(policy, reqs, snaps, full=True, cold=cold)
            results[(name, n)] = (choose_med, route_med, choose_mean, route_mean)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,1000", help="comma-separated fleet sizes")
    parser.add_argument("--decisions", type=int, default=2000, help="timed decisions per policy and size")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cold", action="store_true", help="do not warm the snapshot before each decision")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    results = run(sizes, args.decisions, args.seed, args.cold)
    head = f"{'policy':22s}" + "".join(f"{f'{n} workers':>22s}" for n in sizes)
    for title, at in (("median", 0), ("mean", 2)):
        print(f"µs per decision, {title}: choose (the policy alone) / route (+ the model and readiness filter)")
        print(head)
        for name in POLICIES:
            cells = "".join(
                f"{f'{results[(name, n)][at]:8.1f} / {results[(name, n)][at + 1]:8.1f}':>22s}" for n in sizes
            )
            print(f"{name:22s}{cells}")
        print()
    costs = hash_costs(random.Random(args.seed))
    print("µs per block_hashes(text): " + ", ".join(f"{k:,} chars {v:.1f}" for k, v in costs.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
