#!/usr/bin/env bash
# Deploy trials with real `tc netem` delay and loss inside a host VM, recorded and checked
# (supervisor_dcdeploy/lab/vmtrial.py; docs/testbed.md, "Vagrant VMs"). Needs the VMs that
# `DCVM_KEEP=1 bash vagrant/run-demo.sh` left up (its demo defined a and b); leaves them up
# (`bash vagrant/run-demo.sh` cleans up after a kept run only when run again without
# DCVM_KEEP; or `ip netns exec dcvm vagrant destroy -f` and `bash vagrant/setup-host.sh stop`).
#
# usage: vagrant/chaos-netem.sh OUT_DIR [vmtrial options, e.g. --trials 3 --seed 13]
# env: DCVM_NS (dcvm), HOSTS (3), ZK_NODES (1): as run-demo.sh was given them
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
ns=${DCVM_NS:-dcvm}
hosts_n=${HOSTS:-3}
zk=${ZK_NODES:-1}
out=${1:?usage: chaos-netem.sh OUT_DIR [vmtrial options]}
shift
export VAGRANT_CWD=$here
py=$repo/.venv/bin/python
[ -x "$py" ] || { echo "chaos-netem: run scripts/setup.sh first" >&2; exit 2; }
ip netns list | grep -q "^$ns\b" || { echo "chaos-netem: no namespace $ns: run DCVM_KEEP=1 vagrant/run-demo.sh first" >&2; exit 2; }
mkdir -p "$out"
hosts=(); for i in $(seq "$hosts_n"); do hosts+=("h$i"); done
ip netns exec "$ns" vagrant ssh-config "${hosts[@]}" > "$out/ssh-config"
store_url=zk://$(for i in $(seq "$zk"); do printf '10.216.1.%s:2181,' $((i + 1)); done | sed 's/,$//')/dc
args=(--store "$store_url" --serve-on 10.216.1.1 --ssh-config "$out/ssh-config" --out "$out")
for i in $(seq "$hosts_n"); do
    args+=(--host "h$i=10.216.1.$((10 + i))" --rack "h$i=r$(( (i - 1) % 2 + 1 ))")
done
exec ip netns exec "$ns" "$py" -m supervisor_dcdeploy.lab.vmtrial "${args[@]}" "$@"
