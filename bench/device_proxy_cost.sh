#!/usr/bin/env bash
# Issue 16 on a quiet box with many cores: the lent GPU machine's CPUs (no GPU is used). Runs, in one call,
# bench overhead (JSON and stream) with the router on one core and wrk + nginx on eight others, the same with
# the router on two cores (turbofleet --processes 2 against vllm-router on the same two cores), and bench
# streams at N streams. Results go to $OUT (the device tool) or ./bench-out.
#
# Prepared on the CPU box, in the repo root (all under .whl/, which git ignores; carry .whl/common, .whl/debs,
# .whl/tf and one peer folder; optionally .whl/base, an older revision's tree, e.g.
#   git archive REV proxy balancer worker bench turbofleet pyproject.toml | tar -x -C .whl/base):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform \
#       manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl/common pydantic pydantic_core \
#       annotated_types typing_inspection redis setproctitle orjson uvicorn fastapi \
#       starlette opentelemetry-api                                     # what that image lacks
#   pip download ... -d .whl/vllm vllm-router; pip download ... -d .whl/sglang sglang-router
#   (cd .whl/debs && apt-get download wrk libluajit-5.1-2 nginx redis-server redis-tools libjemalloc2 \
#       liblzf1 liblua5.1-0)                                             # Debian bookworm's
#   .venv/bin/pip wheel --no-deps -w .whl/tf .
# Usage: bash bench/device_proxy_cost.sh PEER STREAMS_N [STREAM_RATE] [STREAM_TOKENS]
#   PEER: vllm or sglang (the folder under .whl/ and the bench's router name)
#   env: ONLY_STREAMS=1 or NO_STREAMS=1 (one part alone), JSON_ROUTERS (the 1-core JSON pass's --routers, e.g.
#   several passes, or a second old tree carried under .whl/), JSON_TIMEOUT, STREAM_ROUTERS, STREAMS_TIMEOUT
set -uo pipefail
PEER=${1:-vllm}
N=${2:-9900}
RATE=${3:-20}
TOKENS=${4:-800}
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
# into the image's own Python environment (a venv there), so that a proxy run from another checkout
# (turbofleet@DIR, which sets PYTHONPATH to DIR) still finds its dependencies
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    .whl/common/*.whl .whl/"$PEER"/*.whl .whl/tf/*.whl || exit 1
BIN=$(python3 -c 'import sys, os; print(os.path.dirname(sys.executable))')
export PATH=$BIN:$PATH PYTHONUNBUFFERED=1
VENV=$(dirname "$BIN")
BASE=""; [ -d .whl/base ] && BASE="turbofleet@.whl/base,"   # an older revision to compare, when carried
for f in .whl/debs/*.deb; do dpkg -x "$f" /; done
ldconfig
ulimit -Hn 1048576 2>/dev/null; ulimit -n "$(ulimit -Hn)"
sysctl -qw net.core.somaxconn=65535 2>/dev/null  # the accept queue for N streams opened at once
{
    date -u; nproc; grep -m1 'model name' /proc/cpuinfo; echo "nofile $(ulimit -Sn)/$(ulimit -Hn)"
    sysctl net.core.somaxconn; python3 --version; wrk --version 2>&1 | head -1; nginx -v 2>&1
    redis-server --version; turbofleet --help >/dev/null && echo "turbofleet ok"
    "$BIN/$PEER-router" --help >/dev/null && echo "$PEER-router ok"
} 2>&1 | tee "$OUT/machine.txt"
TF="python3 -m turbofleet"
run() { echo "+ $*"; timeout "$1" "${@:2}"; echo "rc=$?"; }
if [ -z "${ONLY_STREAMS:-}" ]; then  # ONLY_STREAMS=1: the streams run alone
run "${JSON_TIMEOUT:-120}" $TF bench overhead --routers "${JSON_ROUTERS:-$PEER,${BASE}turbofleet,bare-memory,$PEER,${BASE}turbofleet}" \
    --pin-cores --router-cpus 0 --load-cpus 2-9 --duration 5 --peers-venv "$VENV" --json "$OUT/overhead-json-1core.json"
run 90 $TF bench overhead --routers "$PEER,turbofleet,turbofleet-p2" --pin-cores --router-cpus 0-1 \
    --load-cpus 2-9 --duration 5 --peers-venv "$VENV" --json "$OUT/overhead-json-2cores.json"
run 60 $TF bench overhead --stream --routers "$PEER,${BASE}turbofleet" --pin-cores --router-cpus 0 \
    --load-cpus 2-9 --duration 5 --peers-venv "$VENV" --json "$OUT/overhead-stream-1core.json"
fi
[ -n "${NO_STREAMS:-}" ] && exit 0  # NO_STREAMS=1: the overhead runs alone
run "${STREAMS_TIMEOUT:-300}" $TF bench streams --n "$N" --rate "$RATE" --tokens "$TOKENS" --open-over 25 \
    --routers "${STREAM_ROUTERS:-turbofleet,$PEER}" \
    --peers-venv "$VENV" --json "$OUT/streams-$N.json"
