#!/bin/sh
# Provision one ZooKeeper server: the same script for the Vagrant store VM and the testbed.
# usage: zk.sh ID ADDRESS DATA_DIR ID=ADDRESS [ID=ADDRESS...]
# env:   DCDT_INSTALL=1 install ZooKeeper and the project (install.sh: DCDT_WHEELS, DCDT_SRC,
#        DCDT_VENV); DCDT_START=1 run it as a systemd service
set -eu
sid=$1 address=$2 data=$3
shift 3
py=${DCDT_PYTHON:-python3}
# shellcheck source=/dev/null
. "$(dirname "$0")/install.sh"
if [ "${DCDT_INSTALL:-0}" = 1 ]; then
    dcdt_install zookeeper
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
