#!/usr/bin/env bash
# Install what the tests need (a virtualenv with turbofleet[test], Debian's redis-server, the deploy tools in
# .tools/) and run the whole suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    # Debian's python3 ships venv separately
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      rm -rf .venv && "$PY" -m venv .venv
    else
      echo "python3 -m venv failed: install python3-venv (sudo apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
bash scripts/install-redis.sh
bash scripts/install-chromium.sh   # the dashboard's browser test (issue 12)
bash scripts/install-netbed.sh  # issue 18: ip netns, iptables for the network test bed
# helm, kubectl, kubernetes-validate, hadolint, checkov for tests/test_deploy_*.py (into .tools/; a no-op once there)
bash scripts/install-deploy-tools.sh >/dev/null
.venv/bin/ruff check proxy balancer worker bench turbofleet tests
.venv/bin/mypy   # strict, on every package and on tests/ (pyproject.toml)
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when no test ran: that is a failure here, not a pass
if [ "$rc" -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi
exit "$rc"
