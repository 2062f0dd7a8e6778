"""Turn the bench's parsed options into a workload plan, and run a plan against targets."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from turbofleet.bench import workloads as wl
from turbofleet.bench.client import RequestResult
from turbofleet.bench.runner import RunOptions, Targets, run_multiround, run_static

WORKLOADS = ("multiround", "shared-prefix", "trace", "random")


class PlanError(ValueError):
    """The options do not describe a runnable workload."""


@dataclass
class Plan:
    """A workload ready to run. Multi-round users hold state, so `fresh()` rebuilds them for each run."""

    name: str
    specs: list[wl.RequestSpec] = field(default_factory=list)
    multiround: wl.MultiroundConfig | None = None
    user_rate: float | None = None
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        if self.multiround is not None:
            return self.multiround.users * self.multiround.rounds
        return len(self.specs)

    def describe(self) -> str:
        if self.multiround is not None:
            c = self.multiround
            return (
                f"multiround: {c.users} users x {c.rounds} rounds, system {c.system_tokens}, doc "
                f"{c.first_doc_tokens}, question {c.question_tokens}, answer {c.answer_tokens} tokens, "
                f"think {c.think_time}s"
                + (f", users arriving at {self.user_rate:g}/s (Poisson)" if self.user_rate else "")
            )
        arrivals = "open loop" if self.specs and self.specs[0].arrival is not None else "closed loop"
        prompt = sum(s.prompt_tokens for s in self.specs) / max(1, len(self.specs))
        return f"{self.name}: {len(self.specs)} requests, {arrivals}, mean prompt {prompt:.0f} tokens"


def build_plan(args: argparse.Namespace, what: list[str]) -> Plan:
    """`what` is the positional part after `bench` (or after `bench compare`): WORKLOAD [FILE]."""
    if not what or what[0] not in WORKLOADS:
        raise PlanError(f"workload must be one of {', '.join(WORKLOADS)} (got {' '.join(what) or 'nothing'})")
    name, seed = what[0], args.seed
    if name == "multiround":
        cfg = wl.MultiroundConfig(
            users=args.users,
            rounds=args.rounds,
            system_tokens=args.system_tokens,
            first_doc_tokens=args.first_doc_tokens,
            question_tokens=args.question_tokens,
            answer_tokens=args.answer_tokens,
            think_time=args.think_time,
            session_header=not args.no_session_header,
            seed=seed,
        )
        rate = args.rate if args.arrival in (None, "poisson") else None  # --rate alone means poisson, as elsewhere
        return Plan(name, multiround=cfg, user_rate=rate, seed=seed)
    if name == "shared-prefix":
        specs = wl.shared_prefix(
            args.groups, args.prompts_per_group, args.system_tokens, args.question_tokens, args.output_tokens, seed
        )
        default_arrival = "poisson" if args.rate else "closed"
    elif name == "random":
        specs = wl.random_requests(args.num_requests, args.input_tokens, args.output_tokens, seed)
        default_arrival = "poisson" if args.rate else "closed"
    else:
        path = what[1] if len(what) > 1 else args.trace_file
        if not path:
            raise PlanError("trace needs a FILE: bench trace FILE (a Mooncake jsonl)")
        records = wl.read_trace(path, args.max_requests)
        if not records:
            raise PlanError(f"no requests in {path}")
        specs = wl.trace_requests(records, args.time_scale, args.token_scale, seed)
        default_arrival = "trace"
        meta = {"hit_rate_upper_bound": wl.hit_rate_upper_bound(records, args.token_scale), "trace": str(path)}
    try:
        wl.apply_arrivals(specs, args.arrival or default_arrival, args.rate, seed)
    except ValueError as e:
        raise PlanError(str(e)) from e
    return Plan(name, specs=specs, seed=seed, meta=meta if name == "trace" else {})


async def execute(plan: Plan, targets: Targets, opts: RunOptions) -> list[RequestResult]:
    """Run the plan once. Each call starts multi-round users from their first round."""
    if plan.multiround is not None:
        users = wl.multiround_users(plan.multiround)
        return await run_multiround(users, targets, opts, plan.user_rate, plan.seed)
    return await run_static(plan.specs, targets, opts)
