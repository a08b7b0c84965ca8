#!/usr/bin/env bash
# Prepare a Debian 12 machine (as root) to run the Vagrant testbed under libvirt/qemu:
# install the Debian packages, then start virtlogd and libvirtd by hand inside the network
# namespace $DCVM_NS (default dcvm), at nice 19. Idempotent.
#
# Why a namespace: every bridge, tap and address libvirt makes (the management network,
# the VMs' private network) then lives in that namespace only, never in the root one; the
# VMs reach nothing outside it (no uplink) and everything that talks to them (vagrant ssh,
# the prober, dcdeploy) runs inside it too: `ip netns exec dcvm ...` (vagrant/run-demo.sh).
# Why by hand: no service manager runs in a container; on a workstation with systemd,
# `systemctl start libvirtd` in the root namespace is the usual way instead.
# Why nice 19: qemu inherits it, so the VMs only take CPU nobody else wants.
#
# usage: vagrant/setup-host.sh [install|start|stop|install-check]   (default: install, start)
#        install-check: only what tests/test_vagrant.py needs (vagrant validate, shellcheck);
#        .ci/run uses it
set -euo pipefail
ns=${DCVM_NS:-dcvm}
run=/run/dcvm
packages="vagrant vagrant-libvirt libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86
 qemu-utils debootstrap dnsmasq-base iptables fdisk grub-pc-bin grub2-common rsync shellcheck"

install() {
    # shellcheck disable=SC2086
    if dpkg -s $packages >/dev/null 2>&1; then return; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $packages
}

install_check() {
    local check="vagrant vagrant-libvirt shellcheck"
    # shellcheck disable=SC2086
    if dpkg -s $check >/dev/null 2>&1; then return; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $check
}

running() { [ -s "$run/$1.pid" ] && kill -0 "$(cat "$run/$1.pid")" 2>/dev/null; }

start() {
    mkdir -p "$run"
    ip netns list | grep -qx "$ns\( .*\)\?" || ip netns add "$ns"
    ip -n "$ns" link set lo up
    if pgrep -x libvirtd >/dev/null && ! running libvirtd; then
        echo "setup-host: a libvirtd not started here is running; stop it first" >&2; exit 1
    fi
    if ! running virtlogd; then
        ip netns exec "$ns" nice -n 19 virtlogd -d -p "$run/virtlogd.pid"
    fi
    if ! running libvirtd; then
        # libvirtd checks /dev/kvm as the user qemu runs as (libvirt-qemu, group kvm) each
        # time it looks up the emulator's capabilities; qemu probed as root found KVM. With
        # /dev/kvm root-only (no udev here: 0600 root:root), every lookup judged the cached
        # capabilities stale and probed qemu again (~2 s each; minutes at nice 19 on a busy
        # machine): `vagrant up` spent about 7.5 min before the first domain started. So libvirtd
        # gets, in a mount namespace of its own, the node Debian's udev rule would make:
        # 0660 root:kvm. Nothing outside that namespace changes; the domains still run
        # under DCVM_DRIVER (qemu: TCG).
        # shellcheck disable=SC2016
        ip netns exec "$ns" unshare --mount --propagation private sh -c '
            if [ -c /dev/kvm ] && ! su -s /bin/sh libvirt-qemu -c "test -r /dev/kvm -a -w /dev/kvm" 2>/dev/null; then
                mkdir -p "$1" && mount -t tmpfs -o mode=0755,size=64k dcvm-dev "$1" &&
                mknod -m 0660 "$1/kvm" c "$((0x$(stat -c %t /dev/kvm)))" "$((0x$(stat -c %T /dev/kvm)))" &&
                chgrp kvm "$1/kvm" && mount --bind "$1/kvm" /dev/kvm
            fi
            exec nice -n 19 libvirtd -d -p "$2"' sh "$run/dev" "$run/libvirtd.pid"
    fi
    for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
    virsh -c qemu:///system version >/dev/null
    echo "setup-host: libvirtd $(cat "$run/libvirtd.pid") and virtlogd $(cat "$run/virtlogd.pid") run in namespace $ns at nice 19"
}

stop() {
    for d in libvirtd virtlogd; do
        if running "$d"; then
            pid=$(cat "$run/$d.pid"); kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        fi
        rm -f "$run/$d.pid"
    done
    rmdir "$run/dev" 2>/dev/null || true  # libvirtd's /dev/kvm tmpfs went with its namespace
}

case "${1:-all}" in
    install) install ;;
    install-check) install_check ;;
    start) start ;;
    stop) stop ;;
    all) install; start ;;
    *) echo "usage: $0 [install|start|stop|install-check]" >&2; exit 2 ;;
esac
