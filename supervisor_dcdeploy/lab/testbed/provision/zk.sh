#!/bin/sh
# Provision one ZooKeeper server: the same script for the Vagrant store VM and the testbed.
# usage: zk.sh ID ADDRESS DATA_DIR ID=ADDRESS [ID=ADDRESS...]
# env:   DCDT_INSTALL=1 install ZooKeeper; DCDT_START=1 run it as a systemd service;
#        DCDT_WHEELS a directory of wheels to install the project from instead of an index
set -eu
sid=$1 address=$2 data=$3
shift 3
py=${DCDT_PYTHON:-python3}
if [ "${DCDT_INSTALL:-0}" = 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    # a box with the packages already in it (vagrant/build-box.sh) needs no network here
    if ! dpkg -s zookeeper python3-venv >/dev/null 2>&1; then
        apt-get update -q
        apt-get install -y -q zookeeper python3-venv
    fi
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
peers=""
for peer in "$@"; do peers="$peers --peer $peer"; done
# shellcheck disable=SC2086
cfg=$("$py" -m supervisor_dcdeploy.lab.testbed.provision zk --id "$sid" --address "$address" \
    --data-dir "$data" $peers)
echo "$cfg"
if [ "${DCDT_START:-0}" = 1 ]; then
    cat > /etc/systemd/system/dcdeploy-zookeeper.service <<UNIT
[Unit]
Description=ZooKeeper $sid for dcdeploy
After=network-online.target

[Service]
ExecStart=/usr/bin/java -Xmx256m -cp /usr/share/zookeeper/*:/usr/share/java/* org.apache.zookeeper.server.quorum.QuorumPeerMain $cfg
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
    systemctl daemon-reload
    systemctl enable --now dcdeploy-zookeeper
fi
