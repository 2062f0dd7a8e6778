"""API keys on the inference routes and the admin token on /nodes/* writes."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.procs_kit import http_json, openai_client, start_proxy, start_sim


def test_api_keys_and_admin_token(tmp_path: Path) -> None:
    sim = start_sim(tmp_path, "auth-model")
    proxy = start_proxy(tmp_path, ["--api-keys", "k1", "k2", "--admin-token", "adm"])
    try:
        # admin writes: none -> 401, a client key -> 403, the admin token -> 200
        body = {"url": sim.url, "status": {"models": ["auth-model"], "role": 1}}
        assert http_json("POST", proxy.url + "/nodes/add", body)[0] == 401
        status, err = http_json("POST", proxy.url + "/nodes/add", body, headers={"Authorization": "Bearer k1"})
        assert status == 403 and err["error"]["type"] == "permission_error"
        assert http_json("POST", proxy.url + "/nodes/add", body, headers={"Authorization": "Bearer adm"})[0] == 200
        # inference: no key -> 401 (OpenAI body); a good key works
        bad = openai_client(proxy.url + "/v1", api_key="wrong")
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="auth-model", messages=[{"role": "user", "content": "x"}])
        good = openai_client(proxy.url + "/v1", api_key="k2")
        r = good.chat.completions.create(model="auth-model", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert r.choices[0].message.content
        # health and metrics stay open for probes; the fleet's details need the admin token (issue 11)
        assert http_json("GET", proxy.url + "/health")[0] == 200
        assert http_json("GET", proxy.url + "/metrics")[0] == 200
        assert http_json("GET", proxy.url + "/nodes/status")[0] == 401
        assert http_json("GET", proxy.url + "/nodes/status", headers={"Authorization": "Bearer k1"})[0] == 403
        assert http_json("GET", proxy.url + "/admin/fleet")[0] == 401
        assert http_json("GET", proxy.url + "/nodes/status", headers={"Authorization": "Bearer adm"})[0] == 200
    finally:
        proxy.stop()
        sim.stop()


def test_body_too_large_413(tmp_path: Path) -> None:
    sim = start_sim(tmp_path, "big-model")
    proxy = start_proxy(tmp_path, ["--worker", sim.url, "--max-body-bytes", "1000"])
    try:
        status, body = http_json("POST", proxy.url + "/v1/chat/completions",
                                 {"model": "big-model", "messages": [{"role": "user", "content": "x" * 5000}]})
        assert status == 413 and body["error"]["code"] == "request_too_large"
    finally:
        proxy.stop()
        sim.stop()
