#!/usr/bin/env bash
# Stop 25: a steady-state cProfile of one turbofleet tree under `bench overhead` (JSON, router on core 0).
# cProfile's call counts are exact, so two trees compare by calls per request even on a noisy shared box
# (its times are inflated, roughly alike for both). The tree is copied and its proxy/serve.py patched so that
# SIGUSR1 starts the profiler and SIGUSR2 stops it and writes OUT_DIR/cprof-LABEL.out; the profile covers
# 4 s from 7 s into a 10 s measured run (after the learned limits settled: no queueing then), and the
# requests answered in that window come from /metrics.
#   bash docs/bench/s25/steady_cprofile.sh TREE LABEL [OUT_DIR]      (TREE: e.g. a `git archive REV` export)
#   python docs/bench/s25/cprofile_diff.py OUT/cprof-A.out N_A OUT/cprof-B.out N_B
set -euo pipefail
TREE=$(realpath "$1"); LABEL=$2; OUT=$(realpath "${3:-/tmp}")
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
COPY=/tmp/steady-prof-$LABEL
rm -rf "$COPY"; cp -r "$TREE" "$COPY"
"$ROOT/.venv/bin/python" - "$COPY/proxy/serve.py" "$OUT/cprof-$LABEL.out" <<'PY'
import sys
path, out = sys.argv[1], sys.argv[2]
src = open(path).read()
hook = f'''def serve(settings: Settings) -> int:
    import cProfile
    import signal
    prof = cProfile.Profile()
    signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
    signal.signal(signal.SIGUSR2, lambda *_: (prof.disable(), prof.dump_stats({out!r})))
    return _serve_profiled(settings)


def _serve_profiled(settings: Settings) -> int:
'''
assert "def serve(settings: Settings) -> int:\n" in src
open(path, "w").write(src.replace("def serve(settings: Settings) -> int:\n", hook, 1))
PY
cd "$ROOT"
.venv/bin/turbofleet bench overhead --routers "turbofleet@$COPY" --pin-cores --duration 10 > "$OUT/cprof-$LABEL.bench" 2>&1 &
BENCH=$!
P=
for _ in $(seq 60); do P=$(pgrep -n -f "turbofleet proxy --host" || true); [ -n "$P" ] && break; sleep 0.5; done
PORT=$(tr '\0' ' ' < "/proc/$P/cmdline" | grep -o -- "--port [0-9]*" | cut -d' ' -f2)
answered() { curl -s "localhost:$PORT/metrics" | awk '/^turbofleet_requests_total/ {s += $2} END {printf "%d", s}'; }
sleep 7
n0=$(answered); kill -USR1 "$P"; sleep 4; kill -USR2 "$P"; n1=$(answered)
wait "$BENCH"
echo "$LABEL: $((n1 - n0)) requests in the profile ($OUT/cprof-$LABEL.out)"
tail -n 1 "$OUT/cprof-$LABEL.bench"
