#!/usr/bin/env bash
# The tools the network test bed (bench/netbed.py, issue 18) drives: iproute2 (ip netns, veth, bridge, tc tbf),
# iptables (DROP rules, -m statistic random loss), conntrack (one-way partitions drop live flows). Debian packages; root only.
set -euo pipefail
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v iptables >/dev/null || missing+=(iptables)
command -v conntrack >/dev/null || missing+=(conntrack)
if [ "${#missing[@]}" -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "netbed tests need ${missing[*]} (root + apt-get); they will be skipped" >&2
  exit 0
fi
apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null || true
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null
