#!/usr/bin/env bash
# Build deploy/Dockerfile for real with buildah and run what it built:
#   1. the base: no registry can be reached here, so python:3.11-slim-bookworm is replaced by a STAND-IN built
#      locally (debootstrap --variant=minbase bookworm with python3, python3-venv, python3-pip, python-is-python3;
#      Debian's PEP 668 marker removed, as the official image has none), imported with buildah and tagged as the
#      Dockerfile's PYTHON_IMAGE. Its rootfs tarball is cached in .tools/image-cache (git-ignored).
#   2. `buildah bud --isolation chroot --format docker` of deploy/Dockerfile (docker format keeps the HEALTHCHECK);
#   3. in a network namespace of its own: the proxy (the image's own ENTRYPOINT + CMD, port 8000) and two
#      `turbofleet worker -- turbofleet sim-worker` pairs, each a `buildah run --isolation chroot --network host`;
#   4. drives them with the official openai SDK (a chat completion, a streamed one, a legacy completion), checks
#      the processes run as uid 10001, that the image's HEALTHCHECK command passes against the running proxy
#      (and fails with the proxy gone), and prints the image size;
#   5. stops everything it started.
# Needs root (buildah, debootstrap, ip netns). Usage: bash deploy/check-image.sh   (about 3-6 min cold)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=$ROOT/.tools/image-cache
IMAGE=localhost/turbofleet:check
BASE=$(sed -n 's/^ARG PYTHON_IMAGE=//p' deploy/Dockerfile)
BASE_REF=docker.io/library/$BASE
NS=tf-image-$$
PY=$ROOT/.venv/bin/python

die() { echo "check-image: FAIL: $*" >&2; exit 1; }
say() { echo "check-image: $*" >&2; }
[ "$(id -u)" = 0 ] || die "needs root (buildah, debootstrap and ip netns)"
[ -x "$PY" ] || die "needs the project's .venv with the openai SDK: python3 -m venv .venv && .venv/bin/pip install -e '.[test]'"
bash scripts/install-deploy-tools.sh --image >/dev/null
command -v ip >/dev/null || die "needs ip (Debian: iproute2)"

PIDS=()
CTRS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  for c in "${CTRS[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
  ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT

# ---- 1. the base stand-in
if ! buildah inspect --type image "$BASE_REF" >/dev/null 2>&1; then
  if [ ! -s "$CACHE/base-bookworm.tar" ]; then
    say "building the base stand-in for $BASE with debootstrap (a few minutes; cached in $CACHE)"
    mkdir -p "$CACHE"
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    t0=$(date +%s)
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3 bookworm "$rootfs" \
      ${DEBIAN_MIRROR:-} >"$CACHE/debootstrap.log" 2>&1 || die "debootstrap failed (see $CACHE/debootstrap.log)"
    rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" --numeric-owner -cf "$CACHE/base-bookworm.tar.tmp" .
    mv "$CACHE/base-bookworm.tar.tmp" "$CACHE/base-bookworm.tar"
    rm -rf "$rootfs"
    say "debootstrap took $(( $(date +%s) - t0 )) s"
  fi
  ctr=$(buildah from scratch)
  buildah add "$ctr" "$CACHE/base-bookworm.tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd python3 --label "org.opencontainers.image.description=STAND-IN for $BASE: debootstrap minbase bookworm" \
    "$ctr"
  buildah commit -q --rm "$ctr" "$BASE_REF" >/dev/null
  say "imported the stand-in as $BASE_REF"
fi

# ---- 2. the image
say "building deploy/Dockerfile"
t0=$(date +%s)
# the build stage fetches turbofleet's dependencies from PyPI: it trusts the host's CA bundle for that (RUN only,
# nothing of it stays in the image)
buildah bud --isolation chroot --format docker --pull-never --layers -q -f deploy/Dockerfile \
  --ignorefile deploy/Dockerfile.dockerignore -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
  -t "$IMAGE" . >/dev/null || die "buildah bud failed"
BUILD_S=$(( $(date +%s) - t0 ))
SIZE=$(buildah images --format '{{.Size}}' "$IMAGE" | head -1)
BASE_SIZE=$(buildah images --format '{{.Size}}' "$BASE_REF" | head -1)
say "built $IMAGE in $BUILD_S s: $SIZE (the base stand-in alone: $BASE_SIZE)"

# the image's own ENTRYPOINT + CMD, its HEALTHCHECK command (["CMD", ...] form) and its USER
INSPECT=$(buildah inspect --type image "$IMAGE")
conf() { "$PY" -c "import json, sys; c = json.loads(sys.stdin.read())['Docker']['config']; $1" <<<"$INSPECT"; }
USER_CFG=$(conf 'print(c["User"])')
[ "$USER_CFG" = 10001:10001 ] || die "the image's USER is $USER_CFG, not 10001:10001"
mapfile -t PROXY_ARGV < <(conf 'print("\n".join(c["Entrypoint"] + c["Cmd"]))')
mapfile -t HC < <(conf 't = c["Healthcheck"]["Test"]; assert t[0] == "CMD", t; print("\n".join(t[1:]))')
[ ${#HC[@]} -gt 0 ] || die "the image has no HEALTHCHECK (was it built with --format docker?)"

# ---- 3. the fleet, in a network namespace of its own (so the image's port 8000 is free whatever the host runs)
ip netns add "$NS"
ip -n "$NS" link set lo up
in_ns() { ip netns exec "$NS" "$@"; }
run_in_image() {  # NAME ARGV...: a fresh working container of the image, running ARGV in the background
  local c
  c=$(buildah from --pull-never --name "$1-$$" "$IMAGE")
  CTRS+=("$c")
  shift
  # `ip netns exec` execs buildah, so $! is buildah's pid; buildah passes SIGTERM on to the process it runs
  ip netns exec "$NS" buildah run --isolation chroot --network host "$c" -- "$@" >"$CACHE/$c.log" 2>&1 &
  PIDS+=($!)
}
run_in_image proxy "${PROXY_ARGV[@]}"
for i in 1 2; do
  run_in_image "sim-$i" turbofleet worker --proxy http://127.0.0.1:8000 --advertise-url "http://127.0.0.1:2333$i" \
    --heartbeat-interval 1 -- turbofleet sim-worker --host 127.0.0.1 --port "2333$i" --model sim-model
done

# ---- 4. drive it
in_ns "$PY" - <<'EOF' || die "the fleet from the image did not serve (logs: .tools/image-cache/*.log)"
import json, time, urllib.request
import openai

deadline = time.monotonic() + 180
while True:
    try:
        with urllib.request.urlopen("http://127.0.0.1:8000/nodes/status", timeout=5) as r:
            nodes = json.load(r)
        if len(nodes) == 2:
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        raise SystemExit("two workers did not register within 180 s")
    time.sleep(0.5)
client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none", timeout=60, max_retries=0)
assert [m.id for m in client.models.list().data] == ["sim-model"]
chat = client.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "hello"}], max_tokens=8)
assert chat.choices[0].message.content and chat.usage and chat.usage.completion_tokens > 0, chat
chunks = list(client.chat.completions.create(
    model="sim-model", messages=[{"role": "user", "content": "stream"}], max_tokens=8, stream=True))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text and any(c.choices and c.choices[0].finish_reason for c in chunks), chunks
done = client.completions.create(model="sim-model", prompt="once upon", max_tokens=4)
assert done.choices[0].text, done
print(f"check-image: openai SDK: chat {chat.usage.completion_tokens} tokens, stream {len(chunks)} chunks, "
      f"completion ok; workers {sorted(nodes)}")
EOF

# every turbofleet process the three containers run (proxy, agents, sim-workers) runs as uid 10001
descendants() { local p; for p in $(ps -o pid= --ppid "$1"); do echo "$p"; descendants "$p"; done; }
n=0
for p in "${PIDS[@]}"; do
  for d in $(descendants "$p"); do
    # the processes inside the image's root (not buildah itself, which runs on the host)
    [ "$(readlink "/proc/$d/root" 2>/dev/null)" != / ] || continue
    grep -q turbofleet "/proc/$d/cmdline" 2>/dev/null || continue
    uid=$(awk '/^Uid:/ {print $2}' "/proc/$d/status")
    [ "$uid" = 10001 ] || die "pid $d ($(tr '\0' ' ' <"/proc/$d/cmdline")) runs as uid $uid"
    n=$((n + 1))
  done
done
[ "$n" -ge 5 ] || die "found only $n turbofleet processes (expected the proxy, 2 agents, 2 sim-workers)"
say "uid 10001 for all $n turbofleet processes"

# the HEALTHCHECK command, run in the image beside the proxy: passes while it serves, fails once it is gone
hc=$(buildah from --pull-never --name "hc-$$" "$IMAGE")
CTRS+=("$hc")
in_ns buildah run --isolation chroot --network host "$hc" -- "${HC[@]}" || die "HEALTHCHECK failed against the running proxy"
kill -TERM "${PIDS[0]}"
wait "${PIDS[0]}" 2>/dev/null || true
if in_ns buildah run --isolation chroot --network host "$hc" -- "${HC[@]}" 2>/dev/null; then
  die "HEALTHCHECK passed with no proxy running"
fi
say "HEALTHCHECK (${HC[*]}) passes while the proxy serves and fails once it stops"

# ---- 6. deploy/Dockerfile.worker, as far as this machine allows: LMDeploy's image cannot be pulled here, so it is
# built FROM the same Python stand-in. Every step runs (pip --target uv, uv venv on a Python 3.11, uv pip install of
# turbofleet[nvml], the agent's --help, apt-get install tini), but without LMDeploy, CUDA and /opt/py3, and uv finds
# the base's Python 3.11 instead of downloading one.
say "building deploy/Dockerfile.worker FROM the stand-in (LMDeploy's image cannot be pulled here)"
t0=$(date +%s)
buildah bud --isolation chroot --format docker --pull-never --layers -q -f deploy/Dockerfile.worker \
  --ignorefile deploy/Dockerfile.worker.dockerignore --build-arg "LMDEPLOY_IMAGE=$BASE_REF" --build-arg UV_SYSTEM_CERTS=true \
  -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
  -t localhost/turbofleet-worker:check . >/dev/null || die "buildah bud of Dockerfile.worker failed"
WORKER_S=$(( $(date +%s) - t0 ))
w=$(buildah from --pull-never --name "worker-$$" localhost/turbofleet-worker:check)
CTRS+=("$w")
buildah run --isolation chroot "$w" -- tini --version >/dev/null || die "no tini in the worker image"
# the agent's Python reads NVML (the real nvidia-ml-py, here without a driver: no facts, cleanly)
facts=$(buildah run --isolation chroot "$w" -- /opt/turbofleet/bin/python -c \
  'import asyncio, pynvml; from turbofleet.worker.gpu import gpu_facts; print(asyncio.run(gpu_facts(timeout_s=60)))')
[ "$facts" = "{}" ] || die "GPU facts in the worker image without a GPU: $facts"
say "worker image: built in $WORKER_S s, $(buildah images --format '{{.Size}}' localhost/turbofleet-worker:check | head -1) on the stand-in; tini, the agent and NVML (no driver: {}) run"
echo "check-image: OK: build ${BUILD_S} s, image $SIZE (base stand-in $BASE_SIZE; a stand-in for $BASE)"
