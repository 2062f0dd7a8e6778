#!/bin/sh
# Make sure headless Chromium and its WebDriver exist (the dashboard's browser test drives them with Selenium).
# Quiet and idempotent when both are there; installs Debian's `chromium` and `chromium-driver` with apt-get when
# running as root on Debian (one `apt-get update`, only when the first install finds no package); otherwise says
# what to do and exits non-zero.
set -eu

have_chromium() {
    [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]
}

if have_chromium; then
    exit 0
fi

if [ "$(id -u)" != "0" ]; then
    echo "install-chromium.sh: chromium/chromedriver are missing and this is not root; install them yourself" >&2
    echo "  (Debian: sudo apt-get install -y chromium chromium-driver)" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1 || [ ! -f /etc/debian_version ]; then
    echo "install-chromium.sh: chromium is missing and this is not Debian (no apt-get)" >&2
    exit 1
fi

echo "install-chromium.sh: installing chromium and chromium-driver with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
# other installs may hold dpkg's lock for a while on a shared box: wait for it rather than fail
APT="apt-get -o DPkg::Lock::Timeout=600 -y -q --no-install-recommends"
if ! $APT install chromium chromium-driver fonts-dejavu-core >/dev/null; then
    apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
    $APT install chromium chromium-driver fonts-dejavu-core >/dev/null
fi

if ! have_chromium; then
    echo "install-chromium.sh: apt-get finished but /usr/bin/chromium or /usr/bin/chromedriver is missing" >&2
    exit 1
fi
