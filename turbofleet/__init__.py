"""turbofleet: a request-distribution proxy for LMDeploy fleets."""

__version__ = "0.1.0"
