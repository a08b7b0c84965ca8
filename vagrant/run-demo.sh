#!/usr/bin/env bash
# The Vagrant testbed end to end, in one command (as root, Debian 12):
#   host set-up (packages; libvirtd in the namespace "dcvm"), the box (built once, cached),
#   vagrant up of the store VM and the host VMs, the operator's demo (define a and b, stage
#   1.0 and 2.0 by URL, deploy with dependencies, watch, a prober on the host side checking
#   convergence and quorum; then 3.0 staged through the swarm only, from a seeder on the
#   host side, deployed, each VM's fetch checked to have come via the swarm and its agent to
#   run the chosen engine (libtorrent unless DCVM_ENGINE=transmission):
#   supervisor_dcdeploy/lab/vmdemo.py), dcdeploy status, and
#   vagrant destroy. On exit, Ctrl-C or TERM it leaves no VM, libvirt network, namespace or
#   process of its own behind. Prints the wall-clock time of every step.
#
# env: DCVM_DRIVER (kvm|qemu, default: vagrant/driver.sh), HOSTS (3), ZK_NODES (1),
#      VAGRANT_BOX (default: the box vagrant/build-box.sh makes), DCVM_KEEP=1 (leave it up),
#      DCVM_SWARM (the version staged through the swarm, default 3.0; empty: no swarm step),
#      DCVM_ENGINE (the VMs' and the seeder's BitTorrent engine: libtorrent, the default, or
#      transmission)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
ns=${DCVM_NS:-dcvm}
export DCVM_NS=$ns VAGRANT_CWD=$here
export HOSTS=${HOSTS:-3} ZK_NODES=${ZK_NODES:-1}
swarm=${DCVM_SWARM-3.0}
export DCVM_ENGINE=${DCVM_ENGINE:-libtorrent}  # the Vagrantfile's DCDT_ENGINE too
py=$repo/.venv/bin/python
[ -x "$py" ] || { echo "run-demo: run scripts/setup.sh first (the operator's side uses .venv)" >&2; exit 2; }
times=$(mktemp)  # a file: steps run in $(...) subshells too
inns() { ip netns exec "$ns" "$@"; }
step() {  # step NAME COMMAND...: run it, record its wall-clock time
    local name=$1 t0 rc=0; shift
    echo "run-demo: $(date -u +%T) $name" >&2
    t0=$(date +%s.%N)
    # in the background: bash runs the INT/TERM trap only once a foreground command is done,
    # so `kill -TERM` of this script waited for all of `vagrant up`; `wait` is interrupted
    "$@" &
    wait $! || rc=$?
    printf '  %7.1f s  %s%s\n' "$(echo "$(date +%s.%N) - $t0" | bc)" "$name" \
        "$([ $rc = 0 ] || echo " (FAILED, exit $rc)")" >> "$times"
    return $rc
}
report() { echo; echo "run-demo: wall-clock time per step"; cat "$times"; rm -f "$times"; }

tree() {  # a process and its descendants, parents first
    local c
    echo "$1"
    for c in $(pgrep -P "$1"); do tree "$c"; done
}
cleanup() {
    local rc=$? pids
    trap - EXIT INT TERM
    set +e
    # the step that was running (vagrant up, the demo) and whatever it started: the list
    # first, then one kill, parents first; a step killed after its children would go on
    # (up_all started a second `vagrant up` when the first one died)
    pids=$(for c in $(pgrep -P $$); do tree "$c"; done)
    # shellcheck disable=SC2086
    [ -n "$pids" ] && kill $pids 2>/dev/null
    wait
    if [ "${DCVM_KEEP:-0}" = 1 ] && [ $rc = 0 ]; then report; exit 0; fi
    if ip netns list | grep -q "^$ns\b" && [ -d "$here/.vagrant/machines" ]; then
        step "vagrant destroy" timeout 600 ip netns exec "$ns" vagrant destroy -f
    fi
    # whatever vagrant left (an interrupted up): domains, then networks, named dcvm-*
    for d in $(virsh -c qemu:///system list --all --name 2>/dev/null | grep '^dcvm-'); do
        virsh -c qemu:///system destroy "$d" >/dev/null 2>&1
        virsh -c qemu:///system undefine "$d" --remove-all-storage >/dev/null 2>&1
    done
    for n in $(virsh -c qemu:///system net-list --all --name 2>/dev/null | grep '^dcvm-'); do
        virsh -c qemu:///system net-destroy "$n" >/dev/null 2>&1
        virsh -c qemu:///system net-undefine "$n" >/dev/null 2>&1
    done
    bash "$here/setup-host.sh" stop
    ip netns list | grep -q "^$ns\b" && ip netns delete "$ns"
    report
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "host set-up (packages, libvirtd in namespace $ns)" bash "$here/setup-host.sh"
box=$(step "box (built once, then cached)" bash "$here/build-box.sh" | tail -1)
step "wheels for the VMs" bash "$here/wheels.sh" >/dev/null
DCVM_DRIVER=$(step "driver probe" bash "$here/driver.sh" | tail -1)
export DCVM_DRIVER
echo "run-demo: libvirt driver $DCVM_DRIVER, box ${VAGRANT_BOX:-$box}" >&2
if [ -z "${VAGRANT_BOX:-}" ]; then
    cache=${DCVM_CACHE:-$HOME/.cache/dcdeploy}
    ln -sf "$box" "$cache/dcdeploy-bookworm.box"
    if [ "$(cat "$cache/box-added" 2>/dev/null)" != "$box" ]; then
        # a rebuilt box replaces the old one and the image libvirt made of it
        for v in $(virsh -c qemu:///system vol-list default 2>/dev/null | awk '/bookworm-local/ {print $1}'); do
            virsh -c qemu:///system vol-delete --pool default "$v" >/dev/null
        done
        step "vagrant box add" vagrant box add --force --name dcdeploy/bookworm-local "$box"
        echo "$box" > "$cache/box-added"
    fi
fi
stores=(store); [ "$ZK_NODES" = 3 ] && stores=(store store2 store3)
hosts=(); for i in $(seq "$HOSTS"); do hosts+=("h$i"); done
# all VMs at once (vagrant-libvirt boots them in parallel); each output line gets a time
# stamp, so every VM's milestones (domain started, booted, provisioned) can be read off
uplog=${DCVM_UPLOG:-/tmp/dcvm-up.log}
stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date -u +%T)" "$line"; done; }
# (through `script`: on a pipe vagrant's output is block-buffered and the stamps would lie;
# tr's too, hence stdbuf)
up_once() {
    inns script -qefc "vagrant up ${stores[*]} ${hosts[*]}" /dev/null 2>&1 | stdbuf -oL tr '\r' '\n' \
        | stamp | tee -a "$uplog"
}
# Vagrant 2.3.4's parallel up can lose a machine to a race in its machine index ("No such
# file or directory @ apply2files - ~/.vagrant.d/data/machine-index/<id>.lock": h3, with 6
# VMs); it then destroys that one and finishes the others. A second `vagrant up` creates
# and provisions only what is missing (running, provisioned VMs are left as they are).
up_all() {
    : > "$uplog"
    up_once && return
    echo "run-demo: $(date -u +%T) vagrant up failed; once more for the VMs it left down" >&2
    up_once
}
step "vagrant up ${stores[*]} ${hosts[*]} (in parallel)" up_all
grep -E ': (Starting domain|Machine booted and ready|Running provisioner)' "$uplog" >&2 || true
store_url=zk://$(for i in $(seq "$ZK_NODES"); do printf '10.216.1.%s:2181,' $((i + 1)); done | sed 's/,$//')/dc
args=(--store "$store_url" --serve-on 10.216.1.1)
for i in $(seq "$HOSTS"); do args+=(--host "h$i=10.216.1.$((10 + i))"); done
# then $swarm through the swarm only; vmdemo reads each VM's status.json with vagrant ssh
args+=(--swarm "$swarm" --engine "$DCVM_ENGINE")
step "the demo (supervisor_dcdeploy/lab/vmdemo.py)" inns "$py" -m supervisor_dcdeploy.lab.vmdemo "${args[@]}"
inns "$repo/.venv/bin/dcdeploy" --store "$store_url" status
