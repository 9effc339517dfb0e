#!/bin/bash
# Builds the Debian 12 host of the real-host test (`cargo xtask vm-test`) from Debian's
# packages: OUT/root.img (ext4, the root file system) and OUT/vmlinuz-*, OUT/initrd.img-* for
# each kernel in it: bookworm's 6.1 (the kernel generation of Debian 12 and Amazon Linux 2023)
# and bookworm-backports' 6.12.
#
# What an OpenHands host has: systemd, Debian's docker.io, a distribution kernel. What the test
# adds: dnsmasq-base (stands in for the VPC resolver), jq (reads the audit file), and a oneshot
# unit that runs the test from the second disk and powers the machine off.
#
# Usage: build-image.sh OUT   (as root; ~2-3 minutes; needs debootstrap and e2fsprogs)
set -euo pipefail

out=$1
here=$(cd "$(dirname "$0")" && pwd)
mirror=http://deb.debian.org/debian
root=$out/root

rm -rf "$root" "$out/root.img" "$out"/vmlinuz-* "$out"/initrd.img-*
mkdir -p "$out"

cleanup() {
    for m in dev/pts dev sys proc; do
        mountpoint -q "$root/$m" && umount -l "$root/$m"
    done
    return 0
}
trap cleanup EXIT

debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,udev,dbus,kmod,iproute2,ca-certificates \
    bookworm "$root" "$mirror"

mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
# No service starts inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"
cat > "$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
deb $mirror bookworm-backports main
EOF
in_root() { DEBIAN_FRONTEND=noninteractive chroot "$root" "$@"; }
in_root apt-get update -q
in_root apt-get install -y -q --no-install-recommends \
    linux-image-cloud-amd64 initramfs-tools docker.io dnsmasq-base jq
# The newer kernel beside the first: upgrading the meta package leaves the 6.1 image installed.
in_root apt-get install -y -q --no-install-recommends -t bookworm-backports linux-image-cloud-amd64
in_root apt-get clean
rm -f "$root/usr/sbin/policy-rc.d"

# The machine: no network at all (nothing leaves the test machine), root without a password
# on the console (for `vm-test --keep`), the resolver an EC2 instance has (the VPC's, here a
# local stand-in the test starts).
: > "$root/etc/machine-id"
echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" > "$root/etc/fstab"
echo openhands-host > "$root/etc/hostname"
echo "nameserver 169.254.169.253" > "$root/etc/resolv.conf"
in_root passwd -d root >/dev/null
# Timers and gettys that would only compete with the test for the emulated CPUs.
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
    e2scrub_reap.service getty@tty1.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$u"
done
install -m 0755 "$here/guest/vmtest" "$root/usr/local/sbin/vmtest"
install -m 0644 "$here/guest/vmtest.service" "$root/etc/systemd/system/vmtest.service"
ln -sf /etc/systemd/system/vmtest.service \
    "$root/etc/systemd/system/multi-user.target.wants/vmtest.service"

cleanup
cp "$root"/boot/vmlinuz-* "$root"/boot/initrd.img-* "$out/"
mkfs.ext4 -q -F -L root -d "$root" "$out/root.img" 4G
rm -rf "$root"
ls "$out"
