#!/bin/sh
# Provision one dcdeploy host: the same script for a Vagrant VM and a testbed namespace.
# usage: host.sh NAME RACK ADDRESS ROOT STORE_URL NAME=PORT [NAME=PORT...]
# env:   DCDT_WHEELS     a directory of wheels to install from instead of an index
#        DCDT_INSTALL=1  install packages and the project (VMs only; install.sh, which
#                        also reads DCDT_VENV)
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
# shellcheck source=/dev/null
. "$(dirname "$0")/install.sh"
if [ "${DCDT_INSTALL:-0}" = 1 ]; then
    dcdt_install transmission-daemon iproute2
    systemctl disable --now transmission-daemon 2>/dev/null || true
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
