#!/usr/bin/env bash
# Build a small Debian 12 Vagrant box for the libvirt provider from Debian packages alone:
# debootstrap into a partitioned raw image, a kernel booted by GRUB, openssh-server, the
# vagrant user with Vagrant's published insecure key (copied from the vagrant package at
# build time) and password-less sudo, the packages the provisioning scripts need already
# installed (so the VMs need no network of their own), the virtualenv /opt/dcdeploy with the
# project's dependencies from vagrant/wheels.sh already in it (so provisioning installs only
# the project itself: no ensurepip, no dependency installs under emulation), qemu-img to
# qcow2, metadata.json, tar.
#
# usage: vagrant/build-box.sh            (as root; prints the .box path)
# env:   DCVM_CACHE   cache directory (default ~/.cache/dcdeploy); the box is kept there and
#                     built again only when BOX_VERSION (in its name) changes
#        DCVM_MIRROR  Debian mirror (default http://deb.debian.org/debian)
#        DCVM_DISK_GB virtual disk size (default 8)
# On a workstation any Debian 12 box works instead (VAGRANT_BOX=debian/bookworm64).
set -euo pipefail
cache=${DCVM_CACHE:-$HOME/.cache/dcdeploy}
mirror=${DCVM_MIRROR:-http://deb.debian.org/debian}
size=${DCVM_DISK_GB:-8}
BOX_VERSION=3
box=$cache/dcdeploy-bookworm-v$BOX_VERSION.box
if [ -s "$box" ]; then echo "$box"; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "build-box.sh: needs root (debootstrap, loop devices)" >&2; exit 2; }
# Mount nothing where other mount namespaces can copy it: a copy made by a namespace
# started meanwhile (`ip netns exec ... libvirtd`) kept the image's filesystem mounted after
# our umount, and the box shipped a dirty ext4 whose last files (grub.cfg) sat in the
# journal, which GRUB does not read: the VM stopped at the grub> prompt.
if [ -z "${DCVM_PRIVATE_MOUNTS:-}" ]; then
    exec env DCVM_PRIVATE_MOUNTS=1 unshare --mount --propagation private bash "$0" "$@"
fi
for tool in debootstrap sfdisk losetup mkfs.ext4 grub-install qemu-img; do
    command -v "$tool" >/dev/null || { echo "build-box.sh: $tool missing (vagrant/setup-host.sh installs it)" >&2; exit 2; }
done
key=""
for k in /usr/share/vagrant/keys/vagrant.pub /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
         /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub; do
    [ -s "$k" ] && { key=$k; break; }
done
[ -n "$key" ] || { echo "build-box.sh: Vagrant's insecure public key (keys/vagrant.pub) not found: install vagrant" >&2; exit 2; }

work=$(mktemp -d "$cache/build.XXXXXX" 2>/dev/null || { mkdir -p "$cache"; mktemp -d "$cache/build.XXXXXX"; })
img=$work/box.raw mnt=$work/root loop="" part=""
cleanup() {
    set +e
    for m in dev/pts dev proc sys; do mountpoint -q "$mnt/$m" && umount -l "$mnt/$m"; done
    mountpoint -q "$mnt" && umount -l "$mnt"
    [ -n "$part" ] && losetup -d "$part"
    [ -n "$loop" ] && losetup -d "$loop"
    rm -rf "$work"
}
trap cleanup EXIT
step() { echo "build-box: $(date -u +%T) $*" >&2; }

step "image ${size}G, one ext4 partition"
truncate -s "${size}G" "$img"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$img"
# the partition gets a loop device of its own (at its offset): partition scanning (-P) makes
# no /dev/loopNp1 in a container; grub-install then finds the root by its UUID
loop=$(losetup -f --show "$img")
part=$(losetup -f --show -o $((2048 * 512)) "$img")
mkfs.ext4 -q -L root "$part"
uuid=$(blkid -s UUID -o value "$part")
mkdir -p "$mnt" && mount "$part" "$mnt"

step "debootstrap bookworm"
debootstrap --include=systemd-sysv,ca-certificates bookworm "$mnt" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
for m in dev dev/pts proc sys; do mount --bind "/$m" "$mnt/$m"; done
printf '#!/bin/sh\nexit 101\n' > "$mnt/usr/sbin/policy-rc.d"; chmod +x "$mnt/usr/sbin/policy-rc.d"
cat > "$mnt/etc/apt/sources.list" <<SRC
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SRC

step "packages: kernel, ssh, sudo, and what provision/{host,zk}.sh install"
chroot "$mnt" env DEBIAN_FRONTEND=noninteractive apt-get update -q >"$work/apt.log" 2>&1
chroot "$mnt" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    linux-image-amd64 initramfs-tools openssh-server sudo rsync ifupdown isc-dhcp-client \
    iproute2 netcat-openbsd procps python3-venv transmission-daemon zookeeper \
    default-jre-headless >>"$work/apt.log" 2>&1 || { tail -20 "$work/apt.log" >&2; exit 1; }
chroot "$mnt" apt-get clean
rm -f "$mnt/usr/sbin/policy-rc.d"

step "virtualenv /opt/dcdeploy with the project's dependencies (vagrant/wheels.sh)"
wheels=$(bash "$(dirname "$0")/wheels.sh" | tail -1)
mkdir -p "$mnt/tmp/dcdeploy-wheels" && cp "$wheels"/*.whl "$mnt/tmp/dcdeploy-wheels/"
# every wheel there: the dependencies, and setuptools and wheel, so provisioning builds the
# project with --no-build-isolation instead of installing a build environment first
chroot "$mnt" sh -c 'python3 -m venv /opt/dcdeploy && /opt/dcdeploy/bin/pip install -q --no-cache-dir \
    --no-index --find-links /tmp/dcdeploy-wheels /tmp/dcdeploy-wheels/*.whl' >"$work/venv.log" 2>&1 \
    || { tail -20 "$work/venv.log" >&2; exit 1; }
rm -rf "$mnt/tmp/dcdeploy-wheels"
# provision/{host,zk}.sh see this file and install only the project into this venv
chroot "$mnt" /opt/dcdeploy/bin/pip freeze > "$mnt/opt/dcdeploy/box-dependencies.txt"

step "system: fstab, network, vagrant user, grub"
echo "UUID=$uuid / ext4 errors=remount-ro 0 1" > "$mnt/etc/fstab"
echo box > "$mnt/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 box\n' > "$mnt/etc/hosts"
cat > "$mnt/etc/network/interfaces" <<NET
auto lo
iface lo inet loopback

allow-hotplug eth0
iface eth0 inet dhcp
NET
chroot "$mnt" useradd -m -s /bin/bash -G sudo vagrant
echo vagrant:vagrant | chroot "$mnt" chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > "$mnt/etc/sudoers.d/vagrant"; chmod 440 "$mnt/etc/sudoers.d/vagrant"
install -d -m 700 -o 1000 -g 1000 "$mnt/home/vagrant/.ssh"
install -m 600 -o 1000 -g 1000 "$key" "$mnt/home/vagrant/.ssh/authorized_keys"
echo 'UseDNS no' > "$mnt/etc/ssh/sshd_config.d/vagrant.conf"
# the services the provisioning scripts run under their own units stay off
chroot "$mnt" systemctl disable transmission-daemon zookeeper >/dev/null 2>&1 || true
# sch_netem for the chaos harness's delay faults is in linux-image-amd64's modules
grub-install --target=i386-pc --boot-directory="$mnt/boot" --modules="part_msdos ext2" "$loop" >"$work/grub.log" 2>&1 \
    || { cat "$work/grub.log" >&2; exit 1; }
kernel=$(find "$mnt/boot" -name "vmlinuz-*" -printf "%f\n" | sort -V | tail -1)
cat > "$mnt/boot/grub/grub.cfg" <<CFG
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
search --no-floppy --fs-uuid --set=root $uuid
linux /boot/$kernel root=UUID=$uuid ro net.ifnames=0 biosdevname=0 console=ttyS0,115200 console=tty0
initrd /boot/initrd.img-${kernel#vmlinuz-}
boot
CFG
rm -f "$mnt/etc/ssh/ssh_host_"*; chroot "$mnt" ssh-keygen -A >/dev/null
cp "$mnt/boot/$kernel" "$cache/vmlinuz"  # vagrant/driver.sh boots it to probe KVM
for m in dev/pts dev proc sys; do umount "$mnt/$m"; done
fstrim "$mnt" 2>/dev/null || true  # blocks freed by apt-get clean stay out of the qcow2
umount "$mnt"
# GRUB ignores the journal: the filesystem must be clean, everything checkpointed
e2fsck -fy "$part" >"$work/fsck.log" 2>&1 || [ $? -le 1 ] || { cat "$work/fsck.log" >&2; exit 1; }
dumpe2fs -h "$part" 2>/dev/null | grep -q '^Filesystem state: *clean$' \
    || { echo "build-box.sh: the image's filesystem is not clean after umount" >&2; exit 1; }
losetup -d "$part" "$loop"; part="" loop=""

step "qcow2 and box"
qemu-img convert -O qcow2 "$img" "$work/box.img"
rm -f "$img"
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %s}\n' "$size" > "$work/metadata.json"
cat > "$work/Vagrantfile" <<VF
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.disk_bus = "virtio"
  end
end
VF
tar -C "$work" -cf "$box.part" metadata.json Vagrantfile box.img
mv "$box.part" "$box"
ln -sfn "$box" "$cache/dcdeploy-bookworm.box"  # the Vagrantfile's box_url
step "done: $(du -h "$box" | cut -f1) $box"
echo "$box"
