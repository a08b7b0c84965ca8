#!/usr/bin/env bash
# Install everything supervisor-dcdeploy's tests, demo and benchmarks need on Debian 12:
# Debian packages (ZooKeeper with a Java runtime, transmission-daemon, iproute2 for network
# namespaces and tc, chromium for the web page's browser test, vagrant + vagrant-libvirt +
# shellcheck for tests/test_vagrant.py's `vagrant validate` and script checks: the VMs
# themselves need vagrant/setup-host.sh), then the package and its
# test extras in a virtualenv at .venv.
# Run as root (or with sudo). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(zookeeper transmission-daemon iproute2 iptables python3-venv procps chromium
          vagrant vagrant-libvirt shellcheck)
missing=()
for pkg in "${packages[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts transmission-daemon as a service on install where an init system runs;
# the project runs its own daemons, one per host.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet transmission-daemon 2>/dev/null; then
    systemctl disable --now transmission-daemon >/dev/null 2>&1 || true
fi

python=""
for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        python=$candidate
        break
    fi
done
[ -n "$python" ] || { echo "setup: Python 3.11 or newer is required" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup: done ($(.venv/bin/python --version), $(dpkg-query -W -f='zookeeper ${Version}' zookeeper), $(dpkg-query -W -f='transmission-daemon ${Version}' transmission-daemon))"
