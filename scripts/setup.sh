#!/bin/bash
# Installs what snapshift, its demo and its tests need on a fresh Debian 12 machine (as root), and only what
# is missing: Debian packages through apt, npm dependencies when the lock file changed. Safe to run often.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils        # the hypervisor, qemu-img, qemu-io, qemu-storage-daemon
  btrfs-progs xfsprogs              # the lab's datastores
  busybox-static cpio               # the tiny guest's initramfs
  libnbd-bin                        # nbdinfo / nbdcopy: references our NBD client is compared with
  qemu-guest-agent                  # a real guest agent for the quiesce tests (run on the host, freeze blocked)
  restic                            # the repository benchmark's yardstick
  zfs-fuse                          # the lab's ZFS datastore (zfs-fuse: no kernel module needed)
  ceph-mon ceph-osd ceph-mgr ceph-common  # single-node Ceph for the RBD storage provider and its lab
  util-linux e2fsprogs xz-utils zstd lz4
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
