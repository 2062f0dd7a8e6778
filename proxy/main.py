"""`turbofleet proxy`: flags -> Settings -> app, served on uvloop with graceful shutdown."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from . import config, reqlog, tracing


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import os

    from pydantic import ValidationError

    from turbofleet.balancer import make_policy

    from .serve import serve
    from .supervisor import resolve_processes, supervise

    try:
        settings = config.build_settings(args, os.environ)
        make_policy(settings.policy, **settings.policy_options)  # a bad policy or option fails here, clearly
        reqlog.resolve(settings.log_format)  # issue 12: a bad --log-format too, and --tracing
        on = tracing.wanted(settings.tracing, os.environ) and settings.tracing == "on"
        if on and importlib.util.find_spec("opentelemetry.sdk") is None:
            raise ValueError("--tracing on needs the otel extra: pip install 'turbofleet[otel]'")
        processes = resolve_processes(settings.processes)
    except (ValueError, TypeError, ValidationError) as e:
        print(f"turbofleet proxy: {e}", file=sys.stderr)
        return 2
    if processes > 1:  # issue 16: N event-loop processes on one port
        return supervise(settings, processes)
    return serve(settings)
