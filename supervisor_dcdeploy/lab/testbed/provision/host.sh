#!/bin/sh
# Provision one dcdeploy host: the same script for a Vagrant VM and a testbed namespace.
# usage: host.sh NAME RACK ADDRESS ROOT STORE_URL NAME=PORT [NAME=PORT...]
# env:   DCDT_WHEELS     a directory of wheels to install from instead of an index
#        DCDT_INSTALL=1  install packages and the project (VMs only)
#        DCDT_START=1    run supervisord as a systemd service (VMs only)
#        DCDT_PYTHON     the Python with supervisor_dcdeploy importable (default python3)
#        DCDT_SRC        the project source (VMs: /vagrant)
#        DCDT_TRANSMISSION=0  no swarm engine program at all (the name is historical)
#        DCDT_ENGINE     the swarm engine: libtorrent (default: the ltdaemon program) or
#                        transmission (transmission-daemon)
#        DCDT_FILE_ROOT  the directory file:// release URLs may read (default: none)
set -eu
name=$1 rack=$2 address=$3 root=$4 store=$5
shift 5
py=${DCDT_PYTHON:-python3}
if [ "${DCDT_INSTALL:-0}" = 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    # a box with the packages already in it (vagrant/build-box.sh) needs no network here
    if ! dpkg -s python3-venv transmission-daemon iproute2 >/dev/null 2>&1; then
        apt-get update -q
        apt-get install -y -q python3-venv transmission-daemon iproute2
    fi
    systemctl disable --now transmission-daemon 2>/dev/null || true
    if [ -f /opt/dcdeploy/box-dependencies.txt ]; then
        # the box (vagrant/build-box.sh) carries the venv with the dependencies, setuptools
        # and wheel: only the project is built and installed (dependencies the box lacks
        # come from the wheels, so a box older than setup.cfg still gets them)
        /opt/dcdeploy/bin/pip install -q --no-index --no-build-isolation \
            ${DCDT_WHEELS:+--find-links "$DCDT_WHEELS"} "${DCDT_SRC:-/vagrant}"
    else
        python3 -m venv /opt/dcdeploy
        if [ -n "${DCDT_WHEELS:-}" ]; then  # the dependencies as wheels, no index
            /opt/dcdeploy/bin/pip install -q --no-index --find-links "$DCDT_WHEELS" "${DCDT_SRC:-/vagrant}"
        else
            /opt/dcdeploy/bin/pip install -q "${DCDT_SRC:-/vagrant}"
        fi
    fi
    py=/opt/dcdeploy/bin/python
fi
tm="--transmission --engine ${DCDT_ENGINE:-libtorrent}"
[ "${DCDT_TRANSMISSION:-1}" = 1 ] || tm=""
services=""
for svc in "$@"; do services="$services --service $svc"; done
# shellcheck disable=SC2086
"$py" -m supervisor_dcdeploy.lab.testbed.provision host --name "$name" --rack "$rack" \
    --address "$address" --root "$root" --store "$store" --python "$py" $tm $services \
    --file-root "${DCDT_FILE_ROOT:-}"
if [ "${DCDT_START:-0}" = 1 ]; then
    cat > /etc/systemd/system/dcdeploy-supervisord.service <<UNIT
[Unit]
Description=supervisord with the dcdeploy agent ($name)
After=network-online.target

[Service]
ExecStart=$py -m supervisor.supervisord -n -c $root/supervisord.conf
KillMode=control-group
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
    systemctl daemon-reload
    systemctl enable --now dcdeploy-supervisord
fi
