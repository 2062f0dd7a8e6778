"""Issue 11, the three credentials: user keys (flags, env, a key file re-read on SIGHUP), the admin token and
the worker token; strict `Bearer` parsing; nothing secret in a body or a log."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.procs_kit import http_json, start_proxy, wait_until
from turbofleet.proxy.app import build_app
from turbofleet.proxy.config import Settings, build_settings
from turbofleet.proxy.tenants import KeyFileError, parse_key_file

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


@asynccontextmanager
async def proxy(**kw: Any) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    kw.setdefault("health_interval", 3600.0)
    async with TestClient(TestServer(build_app(Settings(**kw)))) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": token}


async def test_bearer_is_required_in_any_case_and_nothing_else() -> None:
    async with proxy(api_keys=("k1",)) as c:
        # no worker serves "m": a 503/404 means the key was accepted, 401 that it was not
        for header in ("k1", "Basic k1", "Bearer", "Bearer  ", "Token k1", "Bearer k1 extra", "Bearerk1"):
            r = await c.post("/v1/chat/completions", json=CHAT, headers=bearer(header))
            body = await r.json()
            assert r.status == 401 and body["error"]["type"] == "authentication_error", header
            assert "k1" not in body["error"]["message"]
        for header in ("Bearer k1", "bearer k1", "BEARER k1", "Bearer   k1  "):
            r = await c.post("/v1/chat/completions", json=CHAT, headers=bearer(header))
            assert r.status in (404, 503), header
        assert (await c.post("/v1/chat/completions", json=CHAT)).status == 401
        assert (await c.get("/v1/models", headers=bearer("Bearer nope"))).status == 401


async def test_a_key_with_a_control_byte_never_shows(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with proxy(api_keys=("k1",)) as c:
        r = await c.post("/v1/chat/completions", json=CHAT, headers=bearer("Bearer sk-SECRET\tz"))
        text = await r.text()
        assert r.status == 401 and "SECRET" not in text
    assert all("SECRET" not in rec.getMessage() for rec in caplog.records)


def test_configured_credentials_must_be_header_safe() -> None:
    kws: list[dict[str, Any]] = [{"api_keys": ("ok", "bad key")}, {"admin_token": "a\x01"}, {"worker_token": "é"}]
    for kw in kws:
        with pytest.raises(ValueError) as e:
            build_app(Settings(**kw))
        assert "bad key" not in str(e.value) and "\x01" not in str(e.value)


async def test_worker_token_registers_and_heartbeats_only() -> None:
    async with proxy(admin_token="adm", worker_token="wt") as c:
        url = "http://127.0.0.1:20001"
        add = {"url": url, "status": {"models": ["m"]}, "heartbeat_ttl": 30}
        assert (await c.post("/nodes/add", json=add)).status == 401
        assert (await c.post("/nodes/add", json=add, headers=bearer("Bearer nope"))).status == 403
        assert (await c.post("/nodes/add", json=add, headers=bearer("Bearer wt"))).status == 200
        hb = {"url": url, "load": {"running": 1}}
        assert (await c.post("/nodes/heartbeat", json=hb, headers=bearer("Bearer wt"))).status == 200
        assert (await c.post("/nodes/drain", json={"url": url}, headers=bearer("Bearer wt"))).status == 200
        # the agent's drain reads its in-flight count: a reduced view, without the fleet's details
        r = await c.get("/nodes/status", headers=bearer("Bearer wt"))
        assert r.status == 200 and await r.json() == {url: {"state": "draining", "unfinished": 0}}
        for path in ("/nodes/terminate", "/nodes/terminate_all"):
            assert (await c.post(path, json={"url": url}, headers=bearer("Bearer wt"))).status == 403
        assert (await c.get("/admin/fleet", headers=bearer("Bearer wt"))).status == 403
        r = await c.get("/nodes/status", headers=bearer("Bearer adm"))
        assert r.status == 200 and "labels" in (await r.json())[url]
        # a worker token is no inference key, and an admin token is none either
        assert (await c.post("/v1/chat/completions", json=CHAT, headers=bearer("Bearer wt"))).status in (404, 503)


async def test_worker_token_without_admin_token_guards_registration() -> None:
    async with proxy(worker_token="wt") as c:
        add = {"url": "http://127.0.0.1:20002", "status": {"models": ["m"]}}
        assert (await c.post("/nodes/add", json=add)).status == 401
        assert (await c.post("/nodes/add", json=add, headers=bearer("Bearer wt"))).status == 200
        assert (await c.get("/nodes/status")).status == 200  # LMDeploy's open status without an admin token


def test_credentials_from_the_environment() -> None:
    s = build_settings(None, {"TURBOFLEET_API_KEYS": "a,b", "TURBOFLEET_ADMIN_TOKEN": "adm",
                              "TURBOFLEET_WORKER_TOKEN": "wt", "TURBOFLEET_API_KEYS_FILE": "/k.yaml",
                              "TURBOFLEET_ALLOW_NODES": "10.0.0.0/8 gpu-1"})
    assert s.api_keys == ("a", "b") and s.admin_token == "adm" and s.worker_token == "wt"
    assert s.api_keys_file == "/k.yaml" and s.allow_nodes == ("10.0.0.0/8", "gpu-1")


def test_key_file_yaml_and_json() -> None:
    yaml_text = """
keys:
  sk-a: {tenant: acme, models: ["llama-*"], rpm: 60, tpm: 1000, concurrency: 2, priority: batch,
         max_priority: default}
  sk-b: nightly
"""
    table = parse_key_file(yaml_text)
    tenants = sorted(table.values(), key=lambda t: t.name)
    assert [t.name for t in tenants] == ["acme", "nightly"]
    acme = tenants[0]
    assert acme.allows_model("llama-3") and not acme.allows_model("qwen")
    assert (acme.rpm, acme.tpm, acme.concurrency, acme.priority) == (60, 1000, 2, "batch")
    assert acme.key_id.startswith("k-") and "sk-a" not in repr(acme)
    as_json = parse_key_file(json.dumps([{"key": "sk-c", "tenant": "c"}]))
    assert [t.name for t in as_json.values()] == ["c"]
    for bad in ("keys: {sk-a: {tenant: a, priority: urgent}}", "keys: {sk-a: {rpm: -1}}",
                "keys: {'bad key': {}}", "keys: {sk-a: {colour: red}}", "[1, 2]"):
        with pytest.raises(KeyFileError) as e:
            parse_key_file(bad)
        assert "sk-a" not in str(e.value) and "bad key" not in str(e.value)


def test_key_file_is_reloaded_on_sighup(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  sk-old: {tenant: a}\n")
    proxy = start_proxy(tmp_path, ["--api-keys-file", str(keys)])
    try:
        def status(key: str) -> int:
            return http_json("GET", proxy.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})[0]

        assert status("sk-old") == 200 and status("sk-new") == 401
        keys.write_text("keys:\n  sk-new: {tenant: b}\n")
        proxy.signal(signal.SIGHUP)
        wait_until(lambda: status("sk-new") == 200, 10, what="new key accepted after SIGHUP")
        assert status("sk-old") == 401
        # a broken file keeps the keys in use
        keys.write_text("keys: [oops")
        proxy.signal(signal.SIGHUP)
        wait_until(lambda: "not reloaded" in proxy.output(), 10, what="reload refused")
        assert status("sk-new") == 200
        assert "sk-new" not in proxy.output() and "sk-old" not in proxy.output()
    finally:
        proxy.stop()


def test_admin_token_help_matches_the_code() -> None:
    import argparse

    from turbofleet.proxy.config import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    help_text = next(a.help for a in parser._actions if "--admin-token" in a.option_strings)
    assert help_text is not None and "/admin" not in help_text and "/nodes" in help_text
