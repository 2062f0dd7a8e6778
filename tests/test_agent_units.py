"""The agent's pure parts: advertised address, /metrics parsing, GPU facts without torch, backoff, flags."""

from __future__ import annotations

import argparse
import sys

import pytest

from turbofleet.worker.address import (
    AddressError,
    Endpoint,
    advertise_url,
    detect_routable_ip,
    endpoint_from_command,
    endpoint_from_url,
    probe_url,
)
from turbofleet.worker.child import backoff_delay
from turbofleet.worker.gpu import collect, gpu_facts
from turbofleet.worker.main import add_arguments, build_config
from turbofleet.worker.probe import load_from_metrics, parse_prometheus

# ------------------------------------------------------------------ address


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["lmdeploy", "serve", "api_server", "/m"], Endpoint("0.0.0.0", 23333)),
        (
            ["python3", "-m", "lmdeploy", "serve", "api_server", "/m", "--server-port", "23334"],
            Endpoint("0.0.0.0", 23334),
        ),
        (
            ["/usr/bin/lmdeploy", "serve", "api_server", "/m", "--server-name=10.0.0.5", "--server-port=9"],
            Endpoint("10.0.0.5", 9),
        ),
        # --host/--port belong to other servers: lmdeploy's are --server-name/--server-port
        (["lmdeploy", "serve", "api_server", "/m", "--port", "1"], Endpoint("0.0.0.0", 23333)),
        (["python", "-m", "turbofleet", "sim-worker", "--port", "5000"], Endpoint("127.0.0.1", 5000)),
        (
            ["python", "-m", "turbofleet", "sim-worker", "--host", "0.0.0.0", "--port", "1", "--port", "2"],
            Endpoint("0.0.0.0", 2),
        ),
    ],
)
def test_endpoint_from_command(argv: list[str], expected: Endpoint) -> None:
    assert endpoint_from_command(argv) == expected


def test_endpoint_from_command_bad_port() -> None:
    with pytest.raises(AddressError):
        endpoint_from_command(["lmdeploy", "serve", "api_server", "/m", "--server-port", "x"])


def test_endpoint_from_url() -> None:
    assert endpoint_from_url("http://0.0.0.0:23333/") == Endpoint("0.0.0.0", 23333)
    assert endpoint_from_url("10.1.1.1:80") == Endpoint("10.1.1.1", 80)
    assert endpoint_from_url("https://gpu7.internal") == Endpoint("gpu7.internal", 443, "https")
    assert endpoint_from_url("http://[::1]:8") == Endpoint("::1", 8)
    for bad in ("ftp://x:1", "http://x:notaport", "http://:5"):
        with pytest.raises(AddressError):
            endpoint_from_url(bad)


def test_probe_url_uses_loopback_for_wildcard_binds() -> None:
    assert probe_url(Endpoint("0.0.0.0", 23333)) == "http://127.0.0.1:23333"
    assert probe_url(Endpoint("::", 1)) == "http://[::1]:1"
    assert probe_url(Endpoint("10.0.0.5", 2)) == "http://10.0.0.5:2"


def test_advertise_url_order() -> None:
    wild = Endpoint("0.0.0.0", 23333)
    # --advertise-url wins over everything
    assert (
        advertise_url(wild, "http://gpu1.example:9000/", {"POD_IP": "10.9.9.9"}, "192.168.1.2")
        == "http://gpu1.example:9000"
    )
    # a real bind address is advertised as is
    assert advertise_url(Endpoint("10.0.0.5", 1), None, {"POD_IP": "10.9.9.9"}, "192.168.1.2") == "http://10.0.0.5:1"
    # a wildcard bind: pod IP, then the detected address, then loopback; never 0.0.0.0
    assert advertise_url(wild, None, {"POD_IP": "10.9.9.9"}, "192.168.1.2") == "http://10.9.9.9:23333"
    assert advertise_url(wild, None, {"POD_IP": " "}, "192.168.1.2") == "http://192.168.1.2:23333"
    assert advertise_url(wild, None, {}, None) == "http://127.0.0.1:23333"
    assert advertise_url(wild, None, {"POD_IP": "0.0.0.0"}, "0.0.0.0") == "http://127.0.0.1:23333"
    assert advertise_url(Endpoint("::", 7), None, {"POD_IP": "fd00::5"}, None) == "http://[fd00::5]:7"
    with pytest.raises(AddressError):
        advertise_url(wild, "http://0.0.0.0:1", {}, None)


def test_detect_routable_ip_is_an_address_or_none() -> None:
    ip = detect_routable_ip()
    assert ip is None or (ip != "0.0.0.0" and ip.count(".") == 3)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_build_config_from_flags() -> None:
    cfg = build_config(
        _args(
            "--proxy",
            "http://p:8000/",
            "--label",
            "zone=a",
            "--label",
            "gpu=h100",
            "--role",
            "2",
            "--",
            "lmdeploy",
            "serve",
            "api_server",
            "/m",
            "--server-port",
            "23340",
        ),
        {"POD_IP": "10.2.3.4", "TURBOFLEET_ADMIN_TOKEN": "tok"},
    )
    assert cfg.proxies == ("http://p:8000",)
    assert cfg.command == ("lmdeploy", "serve", "api_server", "/m", "--server-port", "23340")
    assert cfg.probe_url == "http://127.0.0.1:23340"
    assert cfg.advertise_url == "http://10.2.3.4:23340"
    assert cfg.labels == {"zone": "a", "gpu": "h100"}
    assert cfg.role == 2 and cfg.token == "tok"
    attach = build_config(_args("--proxy", "http://p", "--token", "t2", "--attach", "http://127.0.0.1:9"), {})
    assert attach.command == () and attach.advertise_url == "http://127.0.0.1:9" and attach.token == "t2"
    with pytest.raises(ValueError):
        build_config(_args("--proxy", "http://p"), {})  # neither --attach nor a command
    with pytest.raises(ValueError):
        build_config(_args("--proxy", "http://p", "--attach", "http://x:1", "--", "server"), {})
    with pytest.raises(SystemExit):
        _args("--proxy", "http://p", "--label", "novalue", "--attach", "http://x:1")


# -------------------------------------------------------------- /metrics

LMDEPLOY_METRICS = """\
# HELP lmdeploy:num_requests_running Number of requests currently running.
# TYPE lmdeploy:num_requests_running gauge
lmdeploy:num_requests_running{engine="0",model_name="tiny-llama"} 3.0
lmdeploy:num_requests_running{engine="1",model_name="tiny-llama"} 2.0
# TYPE lmdeploy:num_requests_waiting gauge
lmdeploy:num_requests_waiting{engine="0",model_name="tiny-llama"} 4.0
lmdeploy:num_requests_waiting{engine="1",model_name="weird } label, x=\\"y\\""} 1.0
lmdeploy:gpu_cache_usage_perc{engine="0",model_name="tiny-llama"} 0.25
lmdeploy:gpu_cache_usage_perc{engine="1",model_name="tiny-llama"} 0.5
lmdeploy:prefix_cache_hit_rate{engine="0",model_name="tiny-llama"} 0.75 1700000000000
lmdeploy:request_success_total{finished_reason="ResponseType.FINISH"} 67
lmdeploy:time_to_first_token_seconds_bucket{le="+Inf"} 12
process_cpu_seconds_total 1.5e2
broken line without a value
lmdeploy:bad{x="1"} not-a-number
lmdeploy:nan_gauge NaN
"""


def test_parse_prometheus_sums_over_label_sets() -> None:
    samples = parse_prometheus(LMDEPLOY_METRICS)
    assert samples["lmdeploy:num_requests_running"] == [3.0, 2.0]
    assert samples["lmdeploy:num_requests_waiting"] == [4.0, 1.0]
    assert samples["lmdeploy:time_to_first_token_seconds_bucket"] == [12.0]
    assert samples["process_cpu_seconds_total"] == [150.0]
    assert "lmdeploy:bad" not in samples and "lmdeploy:nan_gauge" not in samples and "broken" not in samples


def test_load_from_metrics() -> None:
    load = load_from_metrics(LMDEPLOY_METRICS)
    assert (load.running, load.waiting) == (5, 5)
    assert load.kv_usage == 0.5  # a fraction per engine: the fullest one, not a sum past 1
    assert load.prefix_hit_rate == 0.75
    assert load.busy == 10


def test_load_from_metrics_tolerates_missing_and_odd_values() -> None:
    empty = load_from_metrics("")
    assert (empty.running, empty.waiting, empty.kv_usage, empty.prefix_hit_rate) == (0, 0, 0.0, 0.0)
    pct = load_from_metrics("lmdeploy:gpu_cache_usage_perc 42\nlmdeploy:num_requests_running -1\n")
    assert pct.kv_usage == pytest.approx(0.42) and pct.running == 0


# ------------------------------------------------------------------- GPU


def test_gpu_facts_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert collect() == {}


def test_gpu_facts_with_broken_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    class BrokenCuda:
        @staticmethod
        def is_available() -> bool:
            raise RuntimeError("driver too old")

    class FakeTorch:
        cuda = BrokenCuda

    monkeypatch.setitem(sys.modules, "torch", FakeTorch)
    assert collect() == {}


def test_gpu_facts_with_fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    gib = 1024**3

    class Cuda:
        @staticmethod
        def is_available() -> bool:
            return True

        @staticmethod
        def device_count() -> int:
            return 2

        @staticmethod
        def mem_get_info(i: int) -> tuple[int, int]:
            return (10 + i) * gib, 80 * gib

        @staticmethod
        def get_device_name(i: int) -> str:
            return "NVIDIA H100 80GB HBM3"

    class FakeTorch:
        cuda = Cuda

    monkeypatch.setitem(sys.modules, "torch", FakeTorch)
    facts = collect()
    assert facts["count"] == 2 and facts["total_mib"] == 2 * 80 * 1024 and facts["free_mib"] == 21 * 1024
    assert facts["devices"][1] == {
        "index": 1,
        "name": "NVIDIA H100 80GB HBM3",
        "total_mib": 80 * 1024,
        "free_mib": 11 * 1024,
    }


async def test_gpu_facts_subprocess_without_torch() -> None:
    # the test interpreter has no torch (a CPU box): the subprocess probe answers {}
    try:
        import torch  # noqa: F401
    except ImportError:
        assert await gpu_facts(timeout_s=30) == {}
    else:
        pytest.skip("torch is installed here")
    # an interpreter that cannot run at all: still {}
    assert await gpu_facts(timeout_s=5, python="/nonexistent/python") == {}


# --------------------------------------------------------------- backoff


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_delay(a, 1.0, 10.0) for a in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff_delay(1000, 0.5, 60.0) == 60.0
    assert backoff_delay(0, 5.0, 2.0) == 2.0


# ------------------------------------------------------------------ states on the wire


def test_agent_states_are_the_proxys() -> None:
    """The agent keeps its own copy of the state names (it speaks HTTP only); they must be the proxy's."""
    from turbofleet.balancer.policy import WorkerState as ProxyState
    from turbofleet.proxy.registry.base import STATES
    from turbofleet.worker.agent import WorkerState as AgentState

    assert {s.name: s.value for s in AgentState} == {s.name: s.value for s in ProxyState}
    assert set(STATES) == {s.value for s in ProxyState}
