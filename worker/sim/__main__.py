"""`python -m turbofleet.worker.sim ...`: the same as `turbofleet sim-worker ...`."""

import argparse

from .main import add_arguments, run

parser = argparse.ArgumentParser(prog="python -m turbofleet.worker.sim", description="a simulated LMDeploy api_server")
add_arguments(parser)
raise SystemExit(run(parser.parse_args()))
