"""`bench compare ... --ramp 0.5,1,1.5,2` (issue 10): offered load in steps, as multiples of measured capacity.

Capacity is what the fleet serves with every slot busy: the workload's requests sent closed-loop through the
first router of the list (`--concurrency` slots), requests answered per second; `--capacity RPS` skips the
measurement. Each step replays the same requests with their arrivals rescaled to `step x capacity` (a trace
keeps its burst shape; a closed-loop workload gets Poisson arrivals), through every router, each in front of a
fresh simulated fleet (or the `--fleet-url` servers, salted per run), and reports per router and step:

- goodput: the share of ALL requests sent whose first token came within `--slo-ms`;
- p50/p99 TTFT of the requests served;
- rejections (every request that did not get an answer with a token), early (the answer came within the
  SLO: the client was told at once and may go elsewhere) or late;
- goodput per priority class (`--interactive-share`: that share of requests sends `X-Priority: interactive`,
  the rest `default`) and per tenant (`--tenants big:10,small:1`: each request sends `X-Tenant`, drawn by
  weight);
- every 429: whether it came within the request's queue budget (`--queue-budget`, sent as X-Queue-Timeout) and
  with Retry-After.

Pure parts here (step planning, summaries); `run_ramp` drives bench.compare's `run_one`.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from turbofleet.bench.client import RequestResult
from turbofleet.bench.stats import percentile
from turbofleet.bench.workloads import RequestSpec, poisson_arrivals, sub_rng

PRIORITY_HEADER = "X-Priority"
TENANT_HEADER = "X-Tenant"
BUDGET_HEADER = "X-Queue-Timeout"


def parse_ramp(text: str) -> list[float]:
    steps = [float(x) for x in text.replace(" ", "").split(",") if x]
    if not steps or any(not math.isfinite(s) or s <= 0 for s in steps):
        raise ValueError(f"--ramp wants positive multiples of capacity, e.g. 0.5,1,1.5,2 (got {text!r})")
    return steps


def parse_tenants(text: str | None) -> list[tuple[str, float]]:
    if not text:
        return []
    out = []
    for part in text.split(","):
        name, _, weight = part.partition(":")
        w = float(weight or 1)
        if not name or w <= 0:
            raise ValueError(f"--tenants wants NAME:WEIGHT,... (got {text!r})")
        out.append((name.strip(), w))
    return out


def label(specs: list[RequestSpec], interactive_share: float, tenants: Sequence[tuple[str, float]],
          budget: float | None, seed: int) -> None:
    """Give each request its class, tenant and queue budget headers (seeded: every router gets the same)."""
    rng = sub_rng(seed, "ramp-labels")
    names = [n for n, _ in tenants]
    weights = [w for _, w in tenants]
    for s in specs:
        s.headers[PRIORITY_HEADER] = "interactive" if rng.random() < interactive_share else "default"
        if names:
            s.headers[TENANT_HEADER] = rng.choices(names, weights)[0]
        if budget is not None:
            s.headers[BUDGET_HEADER] = f"{budget:g}"


def at_rate(specs: Sequence[RequestSpec], rate: float, seed: int) -> list[RequestSpec]:
    """Copies of `specs` arriving at `rate` requests/s on average: timed arrivals (a trace) are stretched or
    squeezed, keeping their shape; untimed ones get Poisson arrivals."""
    out = [copy.deepcopy(s) for s in specs]
    if not out:
        return out
    if all(s.arrival is not None for s in out):
        span = max(s.arrival or 0.0 for s in out) - min(s.arrival or 0.0 for s in out)
        if span > 0:
            t0 = min(s.arrival or 0.0 for s in out)
            factor = (len(out) / rate) / span
            for s in out:
                s.arrival = ((s.arrival or 0.0) - t0) * factor
            return out
    for s, t in zip(out, poisson_arrivals(len(out), rate, sub_rng(seed, "ramp", rate)), strict=True):
        s.arrival = t
    return out


def closed(specs: Sequence[RequestSpec]) -> list[RequestSpec]:
    out = [copy.deepcopy(s) for s in specs]
    for s in out:
        s.arrival = None
    return out


def _goodput(rs: Sequence[RequestResult], slo_s: float) -> float:
    if not rs:
        return math.nan
    return sum(1 for r in rs if r.ok and r.ttft is not None and r.ttft <= slo_s) / len(rs)


def step_summary(results: Sequence[RequestResult], specs: Sequence[RequestSpec], slo_s: float,
                 budget: float | None) -> dict[str, Any]:
    """One router at one step (see the module docstring)."""
    by_index = {s.index: s for s in specs}
    served = [r.ttft for r in results if r.ok and r.ttft is not None]
    failed = [r for r in results if not r.ok]
    early = [r for r in failed if r.end - r.start <= slo_s]
    kinds: dict[str, int] = defaultdict(int)
    for r in failed:
        kinds[r.error or "?"] += 1
    groups: dict[str, dict[str, list[RequestResult]]] = {"class": defaultdict(list), "tenant": defaultdict(list)}
    for r in results:
        spec = by_index.get(r.index)
        headers = spec.headers if spec else {}
        groups["class"][headers.get(PRIORITY_HEADER, "default")].append(r)
        if TENANT_HEADER in headers:
            groups["tenant"][headers[TENANT_HEADER]].append(r)
    rejected_429 = [r for r in results if r.status == 429]
    late_429 = [r for r in rejected_429 if budget is not None and r.end - r.start > budget]
    return {
        "requests": len(results),
        "served": len(served),
        "goodput": _goodput(results, slo_s),
        "ttft_p50_ms": percentile(served, 50) * 1e3,
        "ttft_p99_ms": percentile(served, 99) * 1e3,
        "rejected_early": len(early),
        "rejected_late": len(failed) - len(early),
        "errors_by_kind": dict(kinds),
        "goodput_by_class": {k: _goodput(v, slo_s) for k, v in sorted(groups["class"].items())},
        "requests_by_class": {k: len(v) for k, v in sorted(groups["class"].items())},
        "goodput_by_tenant": {k: _goodput(v, slo_s) for k, v in sorted(groups["tenant"].items())},
        "requests_by_tenant": {k: len(v) for k, v in sorted(groups["tenant"].items())},
        "http_429": len(rejected_429),
        "http_429_after_budget": len(late_429),
        "http_429_late_by_ms_max": max(((r.end - r.start - (budget or 0.0)) * 1e3 for r in late_429), default=0.0),
        "http_429_without_retry_after": sum(1 for r in rejected_429 if not r.retry_after),
    }


def _pct(x: Any) -> str:
    return "-" if not isinstance(x, int | float) or math.isnan(x) else f"{100 * x:.1f}%"


def _ms(x: Any) -> str:
    return "-" if not isinstance(x, int | float) or math.isnan(x) else f"{x:.0f}"


def report(ramp: Mapping[str, Any]) -> str:
    """The ramp as a table: one row per router and step."""
    head = ("router", "load", "goodput", "p50 ms", "p99 ms", "rej early", "rej late", "by class", "by tenant",
            "429 late/noRA", "after")
    rows = []
    for router, steps in ramp["runs"].items():
        for step, s in steps.items():
            if "skipped" in s:
                rows.append((router, step, "skipped: " + s["skipped"][:60], *[""] * 8))
                continue
            after = s.get("after")
            rows.append((
                router, f"{float(step):g}x", _pct(s["goodput"]), _ms(s["ttft_p50_ms"]), _ms(s["ttft_p99_ms"]),
                str(s["rejected_early"]), str(s["rejected_late"]),
                " ".join(f"{k} {_pct(v)}" for k, v in s["goodput_by_class"].items()),
                " ".join(f"{k} {_pct(v)}" for k, v in s["goodput_by_tenant"].items()),
                f"{s['http_429_after_budget']}/{s['http_429_without_retry_after']}",
                "-" if not after else f"inflight {after['in_flight']:g} queued {after['queued']:g}",
            ))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    cap = ramp.get("capacity_rps")
    return (f"capacity {cap:.2f} req/s ({ramp.get('capacity_source')}); SLO {ramp['slo_ms']:g} ms; goodput = "
            "first token within the SLO, over all requests sent\n" + "\n".join(lines))


def plot(ramp: Mapping[str, Any], out_dir: str | Path) -> Path:
    from turbofleet.bench.plots import _pyplot

    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for router, steps in ramp["runs"].items():
        xs = [float(k) for k, s in steps.items() if "goodput" in s]
        ys = [100 * s["goodput"] for s in steps.values() if "goodput" in s]
        if xs:
            ax.plot(xs, ys, marker="o", label=router)
    ax.set_xlabel("offered load (x measured capacity)")
    ax.set_ylabel(f"goodput (% of requests, TTFT <= {ramp['slo_ms']:g} ms)")
    ax.set_ylim(0, 101)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / "ramp_goodput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


async def run_ramp(args: argparse.Namespace, plan: Any, specs: list[Any], model: str, log_dir: Path,
                   redis_url: str | None, session: Any, salts: set[str], run_one: Any) -> dict[str, Any]:
    """Measure capacity (unless given), then every router at every step, each run by `run_one` (bench.compare's,
    handed in so that this module does not import compare back). Returns the ramp's JSON."""
    from turbofleet.bench.plan import Plan
    from turbofleet.bench.workloads import new_salt

    steps = parse_ramp(args.ramp)
    base = list(plan.specs)
    if not base:
        raise ValueError("--ramp needs a workload of fixed requests (trace, shared-prefix, random)")
    label(base, args.interactive_share, parse_tenants(args.tenants), args.queue_budget, args.seed)
    salted = args.salt_runs if args.salt_runs is not None else bool(args.fleet_url)

    def salt() -> str | None:
        if not salted:
            return None
        s = new_salt()
        while s in salts:
            s = new_salt()
        salts.add(s)
        return s

    capacity, source = args.capacity, "--capacity"
    if not capacity:
        probe = Plan(plan.name, specs=closed(base[: max(50, len(base) // 2)]), seed=plan.seed)
        probe_args = copy.copy(args)
        if specs[0].kind.startswith("turbofleet"):  # what the fleet serves, not what a queue lets through
            probe_args.proxy_args = f"{args.proxy_args or ''} --admission off"
        summary, _ = await run_one(specs[0], probe, probe_args, model, log_dir, redis_url, session, salt())
        capacity = summary["requests_per_s"]
        source = (f"measured: {summary['ok']} of {summary['requests']} requests closed-loop through {specs[0].label}"
                  f" (no queue), {args.concurrency} slots")
        print(f"bench ramp: capacity {capacity:.2f} req/s ({source})", file=sys.stderr)
        if not capacity:
            raise RuntimeError("capacity measurement served nothing")
    out: dict[str, Any] = {"capacity_rps": capacity, "capacity_source": source, "slo_ms": args.slo_ms,
                           "steps": steps, "runs": {}}
    slo_s = args.slo_ms / 1e3
    for spec in specs:
        runs: dict[str, Any] = {}
        for step in steps:
            step_plan = Plan(plan.name, specs=at_rate(base, step * capacity, args.seed), seed=plan.seed)
            try:
                summary, results = await run_one(spec, step_plan, args, model, log_dir, redis_url, session, salt())
            except (LookupError, RuntimeError) as e:
                runs[f"{step:g}"] = {"skipped": str(e).splitlines()[0][:120]}
                print(f"bench: {spec.label} at {step:g}x: {e}", file=sys.stderr)
                continue
            if args.requests_out:
                from turbofleet.bench.output import write_requests

                write_requests(f"{args.requests_out}.{spec.label.replace(':', '-')}.{step:g}x.jsonl",
                               {spec.label: results})
            s = step_summary(results, step_plan.specs, slo_s, args.queue_budget)
            s["offered_rps"] = step * capacity
            s["after"] = summary.get("after")
            runs[f"{step:g}"] = s
            print(f"bench ramp: {spec.label} {step:g}x goodput {_pct(s['goodput'])}", file=sys.stderr)
        out["runs"][spec.label] = runs
    return out
