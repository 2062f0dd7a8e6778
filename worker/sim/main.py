"""`turbofleet sim-worker`: a simulated LMDeploy api_server (aiohttp on uvloop).

Timing, cache and fault flags are described in worker/sim/config.py, engine.py and faults.py.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import SimConfig

_D_BATCH, _D_PREFILL, _D_BASE, _D_PER_SEQ, _D_MAX_PREFILL = 32, 0.2, 10.0, 0.3, 8192
_D_BLOCK, _D_BLOCKS, _D_MAX_TOKENS = 64, 1024, 128


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=23333, help="port to listen on (default 23333, LMDeploy's)")
    p.add_argument("--model", default="sim-model", help="served model name (default sim-model)")
    p.add_argument(
        "--proxy",
        "--proxy-url",
        dest="proxy",
        default=None,
        help="register once with this proxy (POST {proxy}/nodes/add), as LMDeploy does",
    )
    p.add_argument(
        "--advertise-url",
        default=None,
        help="URL to register (default http://HOST:PORT; a detected address for 0.0.0.0)",
    )
    p.add_argument(
        "--admin-port",
        type=int,
        default=None,
        help="extra listener for /sim/*, /health, /metrics that faults never touch",
    )
    g = p.add_argument_group("timing model")
    g.add_argument(
        "--profile",
        default=None,
        help="a fitted engine profile (worker/sim/profiles/NAME.json, or a path): its values become the "
        "defaults of the timing and cache flags (issue 14; e.g. turbomind-h200-1b5)",
    )
    g.add_argument("--max-batch", type=int, default=_D_BATCH, help=f"running sequences (default {_D_BATCH})")
    g.add_argument(
        "--prefill-ms-per-token",
        type=float,
        default=_D_PREFILL,
        help=f"prefill cost per uncached prompt token (default {_D_PREFILL} ms)",
    )
    g.add_argument(
        "--decode-ms-base", type=float, default=_D_BASE, help=f"fixed cost of a decode step (default {_D_BASE} ms)"
    )
    g.add_argument(
        "--decode-ms-per-seq",
        type=float,
        default=_D_PER_SEQ,
        help=f"decode cost per running sequence (default {_D_PER_SEQ} ms)",
    )
    g.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=_D_MAX_PREFILL,
        help=f"uncached prompt tokens admitted per step (default {_D_MAX_PREFILL})",
    )
    g.add_argument(
        "--prefill-ms-per-token-ctx",
        type=float,
        default=0.0,
        help="extra prefill ms per uncached token per 1,000 prompt tokens (attention; default 0)",
    )
    g.add_argument(
        "--prefill-ms-step", type=float, default=0.0, help="extra ms of a step that prefills (default 0)"
    )
    g.add_argument(
        "--prefill-ms-per-token-batched",
        type=float,
        default=-1.0,
        help="prefill ms per uncached token of a step's prompts other than its longest (batched prefill; "
        "default: --prefill-ms-per-token)",
    )
    g.add_argument(
        "--prefill-ms-per-cached-token",
        type=float,
        default=0.0,
        help="ms per cached prompt token of an admitted prompt (a hit is not free on TurboMind; default 0)",
    )
    g.add_argument(
        "--prefill-cached-ms-curve",
        default="",
        metavar="TOKENS:MS,...",
        help="a hit's cost as a curve of its cached tokens instead: knots through (0, 0), past the last at its "
        "ms per token (worker/sim/hitcost.py; default none)",
    )
    g.add_argument(
        "--gpu-share",
        default=None,
        metavar="NAME_OR_PATH",
        help="time-share one GPU with the other sim workers given the same NAME (a file in /dev/shm, or a "
        "path): each step is stretched by the slowdown for how many of them are busy at once (the profile's "
        "gpu_share tables or --gpu-slowdown-*). Default: the group bench's fleets set in "
        "$TURBOFLEET_SIM_GPU_GROUP when the profile has gpu_share tables, else none; 'off' for none",
    )
    for part, what in (
        ("prefill", "uncached prefill"),
        ("cached", "the cached-token cost (default: the prefill table)"),
        ("decode", "decode"),
        ("step", "a prefill step's own cost (default: the prefill table)"),
    ):
        g.add_argument(
            f"--gpu-slowdown-{part}",
            default=None,
            metavar="F1,F2,...",
            help=f"with --gpu-share: the factor {what} runs slower with 1, 2, ... workers busy (default: "
            "the profile's)",
        )
    g.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="multiply every simulated duration (default 1.0; 0.1 = ten times faster)",
    )
    g.add_argument(
        "--default-max-tokens",
        type=int,
        default=_D_MAX_TOKENS,
        help=f"output tokens when a request gives no max_tokens (default {_D_MAX_TOKENS})",
    )
    g.add_argument(
        "--instant",
        action="store_true",
        help="no engine: answer at once with a fixed precomputed completion (router benchmarks)",
    )
    g.add_argument("--instant-tokens", type=int, default=16, help="tokens of the --instant answer (default 16)")
    c = p.add_argument_group("prefix cache")
    c.add_argument("--block-size", type=int, default=_D_BLOCK, help=f"tokens per block (default {_D_BLOCK})")
    c.add_argument(
        "--cache-blocks", type=int, default=_D_BLOCKS, help=f"cache capacity in blocks, LRU (default {_D_BLOCKS})"
    )
    c.add_argument("--no-prefix-cache", action="store_true", help="disable prefix caching")
    f = p.add_argument_group("faults and misc")
    f.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="start with a fault: MODE[:VALUE][,key=value...] (see worker/sim/faults.py)",
    )
    f.add_argument("--api-keys", nargs="*", default=[], help="require Authorization: Bearer KEY")
    f.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    f.add_argument("--access-log", action="store_true", help="log every request (costs CPU)")


def _apply_profile(args: argparse.Namespace) -> None:
    """--profile: the profile's values replace the flags still at their defaults (issue 14)."""
    from . import hitcost, profiles

    if not getattr(args, "profile", None):
        return
    try:
        data = profiles.load(args.profile)
    except ValueError as e:
        raise SystemExit(f"--profile: {e}") from None
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for key, value in data["engine"].items():
        dest = profiles.FIELDS[key]
        if key == "prefill_cached_ms_curve":
            value = hitcost.format_curve(hitcost.check_curve(value))
        if getattr(args, dest) == parser.get_default(dest):
            setattr(args, dest, type(parser.get_default(dest))(value))


def _gpu_share(
    args: argparse.Namespace,
) -> tuple[str | None, tuple[float, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """The EngineConfig fields of the shared GPU: the group to join and its slowdown tables (issue 14)."""
    import os

    from . import gpushare, profiles

    tables: dict[str, tuple[float, ...]] = {}
    if getattr(args, "profile", None):
        for part, values in (profiles.load(args.profile).get("gpu_share") or {}).items():
            if part in profiles.SHARE_PARTS:
                tables[part] = tuple(float(v) for v in values)
    for part in profiles.SHARE_PARTS:
        text = getattr(args, f"gpu_slowdown_{part}", None)
        if text:
            try:
                tables[part] = gpushare.parse_table(text)
            except ValueError as e:
                raise SystemExit(f"--gpu-slowdown-{part}: {e}") from None
    group = getattr(args, "gpu_share", None)
    if group is None and tables:
        group = os.environ.get(gpushare.ENV_GROUP) or None
    if group == "off":
        group = None
    if group and not tables:
        raise SystemExit("--gpu-share: no slowdown tables (a profile with gpu_share, or --gpu-slowdown-*)")
    return group, tables.get("prefill", ()), tables.get("cached", ()), tables.get("decode", ()), tables.get("step", ())


def config_from_args(args: argparse.Namespace) -> SimConfig:
    from .config import EngineConfig, SimConfig
    from .hitcost import parse_curve

    _apply_profile(args)
    group, slow_prefill, slow_cached, slow_decode, slow_step = _gpu_share(args)
    try:
        curve = parse_curve(args.prefill_cached_ms_curve) if args.prefill_cached_ms_curve else ()
    except ValueError as e:
        raise SystemExit(f"--prefill-cached-ms-curve: {e}") from None
    engine = EngineConfig(
        max_batch=args.max_batch,
        prefill_ms_per_token=args.prefill_ms_per_token,
        decode_ms_base=args.decode_ms_base,
        decode_ms_per_seq=args.decode_ms_per_seq,
        max_prefill_tokens=args.max_prefill_tokens,
        speed=args.speed,
        block_size=args.block_size,
        cache_blocks=args.cache_blocks,
        prefix_cache=not args.no_prefix_cache,
        prefill_ms_per_token_ctx=args.prefill_ms_per_token_ctx,
        prefill_ms_step=args.prefill_ms_step,
        prefill_ms_per_cached_token=args.prefill_ms_per_cached_token,
        prefill_cached_ms_curve=curve,
        prefill_ms_per_token_batched=args.prefill_ms_per_token_batched,
        gpu_share=group,
        gpu_slowdown_prefill=slow_prefill,
        gpu_slowdown_cached=slow_cached,
        gpu_slowdown_decode=slow_decode,
        gpu_slowdown_step=slow_step,
    )
    return SimConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        engine=engine,
        default_max_tokens=args.default_max_tokens,
        instant=args.instant,
        instant_tokens=args.instant_tokens,
        proxy_url=args.proxy,
        advertise_url=args.advertise_url,
        admin_port=args.admin_port,
        faults=tuple(args.fault),
        api_keys=tuple(args.api_keys or ()),
    )


def run(args: argparse.Namespace) -> int:
    import logging

    from .faults import FaultError, parse_fault_spec
    from .runner import serve

    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for spec in args.fault:
        try:
            parse_fault_spec(spec)
        except FaultError as e:
            raise SystemExit(f"--fault {spec!r}: {e}") from None
    if args.max_batch < 1 or args.block_size < 1 or args.default_max_tokens < 1 or args.speed <= 0:
        raise SystemExit("--max-batch, --block-size, --default-max-tokens must be >= 1 and --speed > 0")
    return serve(config_from_args(args), access_log=args.access_log)
