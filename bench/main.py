"""`turbofleet bench`: replay a workload against a URL, compare routers on a simulated fleet (or in front of
servers already running), or measure router overhead against instant backends.

  turbofleet bench WORKLOAD --url URL [--model M] [workload options] [--json OUT] [--plot DIR]
  turbofleet bench compare WORKLOAD [workload options] --workers N --routers SPEC,SPEC,...
  turbofleet bench compare WORKLOAD [workload options] --fleet-url URL [--fleet-url URL ...] --routers SPEC,...
  turbofleet bench overhead --workers 2 --routers turbofleet,lmdeploy,sglang,vllm [--stream]
  turbofleet bench streams --n 1000,5000,10000 --rate 20 --tokens 500 --routers turbofleet,vllm,sglang

WORKLOAD is multiround | shared-prefix | random | trace FILE. Defaults are sized for a 2-core box running four
simulated workers, a router and this client at once.
"""

from __future__ import annotations

import argparse

from turbofleet.bench.peers import DEFAULT_COMPARE_ROUTERS, DEFAULT_OVERHEAD_ROUTERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument(
        "what",
        nargs="+",
        metavar="WORKLOAD",
        help="multiround | shared-prefix | random | trace FILE | compare WORKLOAD.. | overhead | streams",
    )
    g = parser.add_argument_group("target and output")
    g.add_argument("--url", help="OpenAI-compatible base URL (a router or one worker)")
    g.add_argument(
        "--model",
        help="model name (default: the first of URL/v1/models; compare: sim-model, or with --fleet-url the first "
        "of the first fleet URL's /v1/models)",
    )
    g.add_argument("--json", metavar="OUT", help="write the summary (and per-router summaries) as JSON")
    g.add_argument(
        "--requests-out",
        metavar="FILE",
        help="write every request (router, session, worker, start, TTFT, tokens) as JSON lines",
    )
    g.add_argument("--plot", metavar="DIR", help="write ttft_cdf.png and throughput.png into DIR")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s (default 600)")
    g.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")

    g = parser.add_argument_group("arrivals")
    g.add_argument(
        "--arrival",
        choices=("poisson", "closed", "trace"),
        help="poisson (needs --rate), closed (--concurrency slots) or trace timestamps; default: "
        "trace for trace, poisson when --rate is given, else closed; multiround: users in "
        "parallel, --rate makes users arrive as a Poisson process",
    )
    g.add_argument("--rate", type=float, help="requests/s (users/s for multiround) for poisson arrivals")
    g.add_argument("--concurrency", type=int, default=16, help="closed-loop slots (default 16)")

    g = parser.add_argument_group("multiround (also: --system-tokens, --question-tokens)")
    g.add_argument("--users", type=int, default=32, help="concurrent users (default 32)")
    g.add_argument("--rounds", type=int, default=6, help="rounds per user (default 6)")
    g.add_argument(
        "--first-doc-tokens",
        type=int,
        default=1000,
        help="per-user document opening each conversation, 0 to disable (default 1000)",
    )
    g.add_argument("--answer-tokens", type=int, default=100, help="max_tokens per answer (default 100)")
    g.add_argument(
        "--think-time",
        type=float,
        default=1.0,
        help="mean seconds between an answer and the next question, exponential (default 1.0)",
    )
    g.add_argument("--no-session-header", action="store_true", help="do not send X-Session-ID: user-K")

    g = parser.add_argument_group("shared-prefix / random")
    g.add_argument("--groups", type=int, default=48, help="shared-prefix groups (default 48)")
    g.add_argument("--prompts-per-group", type=int, default=6, help="prompts per group (default 6)")
    g.add_argument("--system-tokens", type=int, default=1000, help="shared system prompt tokens (default 1000)")
    g.add_argument("--question-tokens", type=int, default=50, help="question tokens (default 50)")
    g.add_argument("--output-tokens", type=int, default=100, help="max_tokens (default 100)")
    g.add_argument("--input-tokens", type=int, default=500, help="random: prompt tokens (default 500)")
    g.add_argument("--num-requests", type=int, default=200, help="random: requests (default 200)")

    g = parser.add_argument_group("trace")
    g.add_argument("--trace-file", help="Mooncake jsonl (or give it after `trace`)")
    g.add_argument(
        "--time-scale",
        type=float,
        default=0.15,
        help="multiply trace timestamps (0.1 replays 10x faster; default 0.15)",
    )
    g.add_argument("--max-requests", type=int, default=600, help="first N trace requests (default 600)")
    g.add_argument(
        "--token-scale",
        type=float,
        default=0.02,
        help="shrink input/output lengths and the 512-token blocks alike (default 0.02: ~280-token prompts; a "
        "trace block is then 10 words, finer than the sim's 64-token cache blocks, so little reuse shows: use "
        "0.125 with big sim caches to measure reuse, see docs/BENCHMARKS.md)",
    )

    g = parser.add_argument_group("ramp (compare --ramp: offered load in steps of measured capacity; issue 10)")
    g.add_argument("--ramp", help="compare: multiples of capacity to step through, e.g. 0.5,1,1.5,2")
    g.add_argument("--capacity", type=float, help="ramp: capacity in req/s (default: measured closed-loop through "
                   "the first router, --concurrency slots)")
    g.add_argument("--slo-ms", type=float, default=2000.0, help="ramp: TTFT SLO for goodput (default 2000)")
    g.add_argument("--interactive-share", type=float, default=0.0,
                   help="ramp: share of requests sent with X-Priority: interactive (default 0)")
    g.add_argument("--tenants", help="ramp: NAME:WEIGHT,... each request sends X-Tenant drawn by weight")
    g.add_argument("--queue-budget", type=float, help="ramp: seconds sent as X-Queue-Timeout on every request; "
                   "a 429 after it is counted")

    g = parser.add_argument_group("compare / overhead")
    g.add_argument("--workers", type=int, help="simulated workers (compare default 4; overhead default 2)")
    g.add_argument(
        "--routers",
        help=f"comma list of router specs (compare default: {DEFAULT_COMPARE_ROUTERS}; "
        f"overhead default: {DEFAULT_OVERHEAD_ROUTERS}); a spec is NAME[@DIR][:POLICY[/KEY=VALUE...]] (@DIR: a "
        "turbofleet run from another checkout, to compare before/after in one run; /KEY=VALUE: a turbofleet policy "
        "option, to compare policy variants in one run), "
        "NAME in turbofleet, turbofleet-x2, turbofleet-p2 (--processes 2), lmdeploy, sglang, vllm, ideal, "
        "bare-memory, bare-relay",
    )
    g.add_argument("--sim-args", default="", help='extra sim-worker flags, quoted: "--max-batch 8 ..."')
    g.add_argument(
        "--fleet-url",
        action="append",
        metavar="URL",
        help="compare: no simulated fleet; put every router in front of these running OpenAI-compatible servers "
        "(w0, w1, ... in the order given). Repeat it, or list several URLs separated by commas. Each run's "
        "prompts are salted (see --salt-runs)",
    )
    g.add_argument(
        "--salt-runs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="open every prompt of a run with a line `[run SALT]`, a fresh SALT per run, so that no run finds "
        "another run's prompts in a server's prefix cache (default: on with --fleet-url, off on fresh simulated "
        "fleets and for a single --url run)",
    )
    g.add_argument(
        "--proxy-args",
        default="",
        help='extra flags for every turbofleet proxy, quoted: "--policy-option epsilon=0.25 ..."',
    )
    g.add_argument(
        "--ideal-pinning",
        action="store_true",
        help="also run the client-side pseudo-router: session -> worker hash(session) %% N",
    )
    g.add_argument(
        "--redis", help="redis://H:P/DB for turbofleet-redis and turbofleet-x2 (default: start a redis-server)"
    )
    g.add_argument("--peers-venv", help="venv holding peer routers (default: .venv-peers, then PATH)")
    g.add_argument("--log-dir", help="keep process logs here (default: a temp dir, removed)")
    g.add_argument("--connections", type=int, default=64, help="overhead: concurrent connections (default 64)")
    g.add_argument("--duration", type=float, default=10.0, help="overhead: seconds per router (default 10)")
    g.add_argument("--stream", action="store_true", help="overhead: 100 SSE chunks (~16 KB) per response")
    g.add_argument(
        "--pin-cores", action="store_true", help="overhead: router on core 0 (taskset), load generator on core 1"
    )
    g.add_argument("--router-cpus", default="0",
                   help="overhead --pin-cores: the router's cores, taskset syntax (default 0)")
    g.add_argument("--load-cpus", default="1",
                   help="overhead --pin-cores: the load generator's and backends' cores (default 1; wrk runs a "
                        "thread per core)")
    g.add_argument(
        "--backend",
        choices=("auto", "nginx", "sim"),
        default="auto",
        help="overhead: instant backend (auto: nginx when installed)",
    )

    # issue 16: thousands of concurrent streams through one router
    g = parser.add_argument_group("streams (--rate is tokens/s per stream there, default 20)")
    g.add_argument("--n", default="1000,5000,10000", help="streams: concurrent streams, comma list (default "
                   "1000,5000,10000)")
    g.add_argument("--tokens", type=int, default=500, help="streams: tokens per stream (default 500)")
    g.add_argument("--open-over", type=float, help="streams: seconds to open all N (default N/250, at least 2)")
    g.add_argument("--sample-every", type=int, default=10,
                   help="streams: record per-token latency on every K-th stream (default 10)")


def run(args: argparse.Namespace) -> int:
    from turbofleet.bench import aio

    what = list(args.what)
    if what[0] == "compare":
        from turbofleet.bench.compare import run_compare

        return run_compare(args, what[1:])
    if what[0] == "overhead":
        from turbofleet.bench.overhead import run_overhead

        return run_overhead(args)
    if what[0] == "streams":
        from turbofleet.bench.streams import run_streams_bench

        if args.rate is None:
            args.rate = 20.0
        return run_streams_bench(args)
    return aio.run(_single(args, what))


async def _single(args: argparse.Namespace, what: list[str]) -> int:
    import sys

    from turbofleet.bench import report
    from turbofleet.bench.output import detect_model, write_json, write_requests
    from turbofleet.bench.plan import PlanError, build_plan, execute
    from turbofleet.bench.runner import RunOptions, Targets
    from turbofleet.bench.stats import summarize
    from turbofleet.bench.workloads import new_salt

    if not args.url:
        print("bench: --url is required (or use `bench compare`)", file=sys.stderr)
        return 2
    try:
        plan = build_plan(args, what)
    except (PlanError, OSError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    model = args.model or await detect_model(args.url)
    if not model:
        print(f"bench: no --model and {args.url}/v1/models named none", file=sys.stderr)
        return 2
    print(plan.describe(), file=sys.stderr)
    opts = RunOptions(
        model=model,
        concurrency=args.concurrency,
        timeout=args.timeout,
        progress=not args.quiet and sys.stderr.isatty(),
        salt=new_salt() if args.salt_runs else None,
    )
    results = await execute(plan, Targets([args.url]), opts)
    summary = {
        "workload": plan.name,
        "url": args.url,
        "model": model,
        "salt": opts.salt,
        **summarize(results),
        **plan.meta,
    }
    print(report.single(summary))
    if args.json:
        write_json(args.json, {**summary, "config": vars(args) | {"what": what}})
    if args.requests_out:
        write_requests(args.requests_out, {args.url: results})
    if args.plot:
        from turbofleet.bench.plots import plot_runs

        for path in plot_runs({args.url: results}, args.plot, plan.name):
            print(f"wrote {path}", file=sys.stderr)
    if summary["ok"] == 0:
        first = next((r for r in results if r.error), None)
        print(
            f"bench: every request failed ({first.error}: {first.error_detail})"
            if first
            else "bench: nothing was sent",
            file=sys.stderr,
        )
        return 1
    return 0
