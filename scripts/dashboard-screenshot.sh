#!/usr/bin/env bash
# The README's dashboard picture (docs/img/dashboard.png): a proxy and 4 simulated workers with traffic for a
# minute or so, one worker killed, then headless Chromium's screenshot of /status — the browser test's own code
# (tests/dashboard_kit.py). Usage: bash scripts/dashboard-screenshot.sh [OUT.png] [--seconds N]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-chromium.sh
OUT=${1:-docs/img/dashboard.png}
shift || true
exec .venv/bin/python -m tests.dashboard_kit "$OUT" "$@"
