"""The `turbofleet` command: parses arguments and hands them to the room that owns the subcommand.

This is the only module that knows every room. Each room exposes `add_arguments(parser)` and `run(args) -> int`
in its `main` module; imports are lazy so `turbofleet proxy` never loads the simulator or the bench.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module with add_arguments/run, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "proxy": ("turbofleet.proxy.main", "run the routing proxy"),
    "sim-worker": ("turbofleet.worker.sim.main", "run a simulated LMDeploy api_server"),
    "worker": ("turbofleet.worker.main", "run the agent beside an LMDeploy api_server"),
    "up": ("turbofleet.up", "start a proxy and N simulated workers on localhost"),
    "bench": ("turbofleet.bench.main", "replay workloads against routers and compare them"),
    "status": ("turbofleet.status", "the fleet as the proxy sees it, in a terminal (--watch to refresh)"),
    "testbed": ("turbofleet.bench.testbed", "a multi-host fleet in network namespaces (root): up, down, status"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s room is imported (all of them when None, e.g. for docs)."""
    parser = argparse.ArgumentParser(prog="turbofleet", description="A request-distribution proxy for LMDeploy fleets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            importlib.import_module(module).add_arguments(sp)
        sp.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(command if command in COMMANDS else "").parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
