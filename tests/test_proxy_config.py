"""Settings: flags over TURBOFLEET_* over defaults, including the routing policy's options."""

from __future__ import annotations

import argparse

import pytest

from turbofleet.balancer import make_policy
from turbofleet.proxy.config import Settings, add_arguments, build_settings


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_flags_beat_environment_beat_defaults() -> None:
    s = build_settings(parse("--policy", "least_queue"), {"TURBOFLEET_POLICY": "random", "TURBOFLEET_MAX_TRIES": "5"})
    assert s.policy == "least_queue" and s.max_tries == 5 and s.idle_timeout == Settings().idle_timeout


def test_policy_options_from_flags_and_env_reach_the_policy() -> None:
    env = {"TURBOFLEET_POLICY_OPTIONS": '{"epsilon": 0.75, "slack": 4}'}
    s = build_settings(parse("--policy-option", "epsilon=0.25", "--policy-option", "seed=7"), env)
    assert s.policy_options == {"epsilon": 0.25, "slack": 4, "seed": 7}
    policy = make_policy("kv_aware", **s.policy_options)
    assert policy.name == "kv_aware"


def test_bad_policy_options_are_refused() -> None:
    with pytest.raises(SystemExit):
        parse("--policy-option", "no-equals-sign")
    with pytest.raises(ValueError, match="JSON object"):
        build_settings(None, {"TURBOFLEET_POLICY_OPTIONS": "[1, 2]"})
    with pytest.raises(TypeError):
        make_policy("kv_aware", **build_settings(parse("--policy-option", "nonsense=1"), {}).policy_options)


def test_the_drag_weight_option_reaches_kv_aware() -> None:
    """Issue 14 round 2: `--policy-option drag_weight=1` (the bench's `turbofleet:kv_aware/drag_weight=1`)."""
    s = build_settings(parse("--policy-option", "drag_weight=1"), {})
    policy = make_policy("kv_aware", **s.policy_options)
    assert getattr(policy, "drag_weight", None) == 1.0
