#!/usr/bin/env bash
# Print the libvirt domain type the VMs should use here: "kvm" only if a Debian kernel
# really boots under KVM on this machine, else "qemu" (software emulation, TCG). The answer
# is cached in $DCVM_CACHE/driver (vagrant/Vagrantfile reads it); DCVM_DRIVER overrides.
#
# Why a boot and not just /dev/kvm: on some hosts /dev/kvm opens and creates VMs, yet a
# Debian 6.1 kernel hangs right after decompression under KVM (issue 13), while under TCG
# the same kernel reaches its "no root fs" panic in seconds. The probe boots the box's
# kernel (vagrant/build-box.sh keeps a copy) without a disk and waits for that panic.
#
# usage: vagrant/driver.sh [--probe]   (--probe ignores the cache)
set -euo pipefail
cache=${DCVM_CACHE:-$HOME/.cache/dcdeploy}
if [ -n "${DCVM_DRIVER:-}" ]; then echo "$DCVM_DRIVER"; exit 0; fi
if [ "${1:-}" != --probe ] && [ -s "$cache/driver" ]; then cat "$cache/driver"; exit 0; fi
kernel=$cache/vmlinuz
[ -s "$kernel" ] || kernel=$(find /boot -maxdepth 1 -name 'vmlinuz-*' 2>/dev/null | sort -V | tail -1)
answer=qemu why="no /dev/kvm"
if [ -w /dev/kvm ] && [ -n "$kernel" ]; then
    log=$(mktemp)
    # the kernel panics without a root fs; -no-reboot makes qemu exit then
    timeout 60 nice -n 19 qemu-system-x86_64 -accel kvm -cpu max -m 256 -smp 1 -nic none \
        -display none -monitor none -serial "file:$log" -no-reboot \
        -kernel "$kernel" -append "console=ttyS0 panic=-1" >/dev/null 2>&1 || true
    if grep -q "Unable to mount root fs\|Kernel panic" "$log"; then
        answer=kvm why="a kernel booted under KVM to its root-fs panic"
    else
        answer=qemu why="a kernel under KVM did not reach its root-fs panic in 60 s ($(wc -l <"$log") console lines)"
    fi
    rm -f "$log"
elif [ -z "$kernel" ]; then
    why="no kernel to probe with (run vagrant/build-box.sh first)"
fi
mkdir -p "$cache"
echo "$answer" > "$cache/driver"
echo "driver.sh: $answer: $why" >&2
echo "$answer"
