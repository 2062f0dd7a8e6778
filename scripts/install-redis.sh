#!/bin/sh
# Make sure a redis-server binary exists (the registry tests start their own servers with it).
# Quiet and idempotent when it is already there; installs it with apt-get when running as root on Debian or
# Ubuntu; otherwise explains what to do and exits non-zero.
set -eu

have_redis() {
    command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || [ -x /usr/sbin/redis-server ]
}

if have_redis; then
    exit 0
fi

if [ "$(id -u)" != "0" ]; then
    echo "install-redis.sh: redis-server is missing and this is not root; install it yourself" >&2
    echo "  (Debian/Ubuntu: sudo apt-get install -y redis-server; macOS: brew install redis)" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1 || [ ! -f /etc/debian_version ]; then
    echo "install-redis.sh: redis-server is missing and this is not Debian/Ubuntu (no apt-get);" >&2
    echo "  install redis-server (>= 6.2) with your package manager" >&2
    exit 1
fi

echo "install-redis.sh: installing redis-server with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends redis-server >/dev/null; then
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends redis-server >/dev/null
fi
# the package starts a system-wide server on 6379; the tests never use it, each starts its own

if ! have_redis; then
    echo "install-redis.sh: apt-get finished but redis-server is still missing" >&2
    exit 1
fi
