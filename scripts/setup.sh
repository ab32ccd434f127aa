#!/bin/bash
# Installs what snapshift, its demo and its tests need on a fresh Debian 12 machine (as root), and only what
# is missing: Debian packages through apt, npm dependencies when the lock file changed. Safe to run often.
set -euo pipefail
cd "$(dirname "$0")/.."

# Every program the code, the tests and the benchmarks run, and every QEMU driver they use, comes from one of
# these; `bin/snapshift doctor` names the same packages (test/cli/doctor.test.ts keeps the two lists in step).
APT_PACKAGES=(
  qemu-system-x86                   # the lab's guests (qemu-system-x86_64)
  qemu-system-common                # qemu-storage-daemon: reads disks from storage snapshots; the qcow2/raw drivers
  qemu-utils                        # qemu-img, qemu-io, qemu-nbd
  qemu-block-extra                  # QEMU's rbd block driver (block-rbd.so); without it "Unknown driver 'rbd'"
  btrfs-progs xfsprogs              # the btrfs provider and the lab's datastores (btrfs, mkfs.btrfs, mkfs.xfs, xfs_info)
  busybox-static                    # the tiny guest's whole userland (its initramfs is written by our own code)
  libnbd-bin                        # nbdinfo / nbdcopy: references our NBD client is compared with
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients  # the libvirt adapter's tests: the lab's own libvirtd/virtlogd, virsh
  qemu-guest-agent                  # a real guest agent for the quiesce tests (run on the host, freeze blocked)
  restic                            # the repository and restore benchmarks' yardstick
  borgbackup                        # borg: the restore benchmark's second yardstick
  zfs-fuse                          # the lab's ZFS datastore (zfs-fuse: no kernel module needed), zfs, zpool
  ceph-mon ceph-osd ceph-mgr ceph-common ceph-base  # single-node Ceph for the RBD provider and its lab (rbd, ceph, monmaptool)
  util-linux mount                  # setpriv, findmnt; losetup, mount, umount
  e2fsprogs                         # mkfs.ext4 for the full-disk tests
  fdisk                             # sfdisk: the file-level restore test partitions its disks (GPT, MBR)
  findutils                         # find: snapshift files ls (essential, listed for doctor)
  xz-utils zstd                     # the guest kernel's .ko.xz / .ko.zst modules
  cpio lz4                          # no code or test runs these today; kept until someone confirms nobody needs them
  coreutils dpkg apt                # cp --reflink, md5sum, dd, …; unpacking the guest kernel (essential, listed for doctor)
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "snapshift setup: these Debian packages are missing and installing them needs root: ${missing[*]}" >&2
    exit 1
  fi
  echo "snapshift setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# npm ci refuses this lock file on npm 11 (platform-specific optional packages of @napi-rs/blake-hash are
# reported missing), so install from the lock with npm install, and only when it changed.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "snapshift setup: installing npm dependencies"
  npm install --no-audit --no-fund --loglevel=error
fi
