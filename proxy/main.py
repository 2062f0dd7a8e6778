"""`turbofleet proxy`: flags -> Settings -> app, served on uvloop with graceful shutdown."""

from __future__ import annotations

import argparse

from . import config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import os

    from .serve import serve

    settings = config.build_settings(args, os.environ)
    return serve(settings)
