import { probeMissingPath, type Check } from './check.ts';

const formatNodeOnMissingFile = (driver: string): Record<string, unknown> => ({
  driver,
  'node-name': 'probe',
  file: { driver: 'file', filename: probeMissingPath },
});

const program = (name: string, debianPackage: string, neededBy: Check['neededBy'], withoutIt: string): Check => ({
  id: `program:${name}`,
  probe: { kind: 'program', program: name },
  debianPackage,
  neededBy,
  withoutIt,
});

/**
 * Everything the engine, each storage provider, the lab, the tests and the benchmarks need from the host.
 * Programs are the ones our code and tests run (exec/start/spawn); coreutils programs used only as plain
 * shell helpers in tests (rm, mkdir, sleep, true) are left out, since coreutils is Essential in Debian.
 * `test/cli/doctor.test.ts` checks that scripts/setup.sh installs every package named here.
 */
export const checks: readonly Check[] = [
  // Engine core.
  {
    id: 'node-version',
    probe: { kind: 'node-version', minimum: '20.4' },
    remedy: 'install Node.js 20.4 or newer (package.json "engines")',
    neededBy: ['engine'],
    withoutIt: 'snapshift does not run (it needs Symbol.asyncDispose, new in Node 20.4, for every "await using")',
  },
  program('qemu-img', 'qemu-utils', ['engine'], 'restore --format qcow2 fails, and the hunter cannot commit an overlay a crashed run left once its QEMU is gone'),
  program('qemu-storage-daemon', 'qemu-system-common', ['engine'], 'storage-snapshot mode cannot read disks from a storage snapshot (every VM falls back to regular mode)'),
  program('setpriv', 'util-linux', ['engine'], 'storage-snapshot mode cannot start its reader daemons (they run under setpriv --pdeathsig)'),
  program('findmnt', 'util-linux', ['engine'], 'no disk is found on a storage system: storage list shows none, storage-snapshot mode always falls back to regular mode'),
  {
    id: 'qemu-block-driver:qcow2',
    probe: { kind: 'qemu-block-driver', driver: 'qcow2', blockdev: formatNodeOnMissingFile('qcow2') },
    debianPackage: 'qemu-system-common',
    neededBy: ['engine'],
    withoutIt: 'storage-snapshot mode cannot read qcow2 disks from a storage snapshot',
  },
  {
    id: 'qemu-block-driver:raw',
    probe: { kind: 'qemu-block-driver', driver: 'raw', blockdev: formatNodeOnMissingFile('raw') },
    debianPackage: 'qemu-system-common',
    neededBy: ['engine'],
    withoutIt: 'storage-snapshot mode cannot read raw disks from a storage snapshot',
  },

  // Storage providers.
  program('btrfs', 'btrfs-progs', ['btrfs', 'lab'], 'no storage snapshots on btrfs (btrfs subvolume snapshot); the lab cannot make its btrfs datastore'),
  program('cp', 'coreutils', ['xfs', 'lab'], 'no storage snapshots on XFS (reflink clones with cp --reflink=always); the demo cannot keep its reference copy'),
  program('zfs', 'zfs-fuse', ['zfs', 'lab-zfs'], 'no storage snapshots on ZFS (zfs snapshot + clone)'),
  program('zpool', 'zfs-fuse', ['zfs', 'lab-zfs'], 'the ZFS provider cannot tell whether the ZFS daemon answers; the lab cannot make its pool'),
  program('virsh', 'libvirt-clients', ['libvirt'], 'no libvirt hosts: snapshift talks to libvirt through virsh'),
  program('rbd', 'ceph-common', ['ceph-rbd', 'lab-ceph'], 'no storage snapshots on Ceph RBD (rbd snap create, rbd diff)'),
  {
    id: 'qemu-block-driver:rbd',
    probe: {
      kind: 'qemu-block-driver',
      driver: 'rbd',
      // A Ceph config that does not exist: librbd fails reading it, before it could reach any monitor.
      blockdev: { driver: 'rbd', 'node-name': 'probe', pool: 'probe', image: 'probe', conf: `${probeMissingPath}.conf` },
      moduleName: 'block-rbd.so', // in /usr/lib/x86_64-linux-gnu/qemu, from qemu-block-extra
    },
    debianPackage: 'qemu-block-extra',
    neededBy: ['ceph-rbd', 'lab-ceph'],
    withoutIt: `QEMU cannot open RBD images ("Unknown driver 'rbd'"): no backup from an RBD storage snapshot, no lab VM on RBD`,
  },
  {
    id: 'filesystem:btrfs',
    probe: { kind: 'filesystem', name: 'btrfs' },
    remedy: 'a kernel with btrfs (modprobe btrfs)',
    neededBy: ['btrfs', 'lab'],
    withoutIt: 'no btrfs volume can be mounted: no btrfs storage snapshots, no lab btrfs datastore',
  },
  {
    id: 'filesystem:xfs',
    probe: { kind: 'filesystem', name: 'xfs' },
    remedy: 'a kernel with XFS (modprobe xfs)',
    neededBy: ['xfs', 'lab'],
    withoutIt: 'no XFS volume can be mounted: no XFS storage snapshots, no lab XFS datastore',
  },

  // File-level restore (snapshift files): qemu-storage-daemon (engine) presents a disk as a file over FUSE,
  // loop devices over it, read-only mounts.
  program('find', 'findutils', ['files'], 'snapshift files ls cannot list a folder of a restore point'),

  // The lab (and the demo, which runs in it).
  {
    id: 'root',
    probe: { kind: 'root' },
    remedy: 'run as root',
    neededBy: ['lab'],
    withoutIt: 'the lab cannot attach loop devices or mount its datastores',
  },
  {
    id: 'device:/dev/loop-control',
    probe: { kind: 'device', path: '/dev/loop-control' },
    remedy: 'load the loop module (modprobe loop), or give the container the loop devices',
    neededBy: ['lab', 'tests', 'files'],
    withoutIt: 'no loop devices: the lab has no datastores, the full-disk tests cannot mount their small filesystem, snapshift files mounts nothing',
  },
  program('losetup', 'mount', ['lab', 'files'], 'the lab cannot attach its datastore images to loop devices'),
  program('mount', 'mount', ['lab', 'tests', 'files'], 'the lab cannot mount its datastores'),
  program('umount', 'mount', ['lab', 'tests', 'files'], 'lab down cannot unmount its datastores'),
  program('mkfs.btrfs', 'btrfs-progs', ['lab'], 'the lab cannot make its btrfs datastore'),
  program('mkfs.xfs', 'xfsprogs', ['lab'], 'the lab cannot make its XFS datastore'),
  program('qemu-system-x86_64', 'qemu-system-x86', ['lab'], 'the lab cannot start guests (lab vm start, the demo, the real-guest tests)'),
  program('busybox', 'busybox-static', ['lab'], "the lab guest's initramfs cannot be built (busybox is its whole userland)"),
  program('dpkg', 'dpkg', ['lab'], 'the guest kernel cannot be unpacked from its Debian package (first lab use)'),
  program('apt-get', 'apt', ['lab'], 'the guest kernel package cannot be downloaded (first lab use)'),
  program('apt-cache', 'apt', ['lab'], 'the guest kernel package cannot be resolved (first lab use)'),
  program('xz', 'xz-utils', ['lab'], "the guest kernel's .ko.xz modules cannot be unpacked"),
  program('zstd', 'zstd', ['lab'], "the guest kernel's .ko.zst modules cannot be unpacked"),
  program('md5sum', 'coreutils', ['lab'], 'the demo cannot prove its restores equal the point in time'),
  {
    id: 'device:/dev/kvm',
    probe: { kind: 'kvm' },
    remedy: 'load kvm_intel or kvm_amd (in a VM: enable nested virtualisation)',
    neededBy: ['lab'],
    withoutIt: 'lab guests run several times slower',
    fallback: 'TCG (software emulation): guests still boot, the tests and the demo still pass',
  },
  {
    id: 'device:/dev/fuse',
    probe: { kind: 'device', path: '/dev/fuse' },
    remedy: 'load the fuse module (modprobe fuse), or give the container /dev/fuse',
    neededBy: ['lab-zfs', 'files'],
    withoutIt: 'zfs-fuse cannot start: no ZFS datastore in the lab; qemu-storage-daemon cannot present a disk as a file: no file-level restore',
  },
  program('zfs-fuse', 'zfs-fuse', ['lab-zfs'], 'the lab cannot start its ZFS daemon'),
  program('ceph-mon', 'ceph-mon', ['lab-ceph'], "the lab's Ceph has no monitor"),
  program('ceph-osd', 'ceph-osd', ['lab-ceph'], "the lab's Ceph has no OSD"),
  program('ceph-mgr', 'ceph-mgr', ['lab-ceph'], "the lab's Ceph has no manager"),
  program('ceph', 'ceph-common', ['lab-ceph'], "the lab cannot set up or watch its Ceph (pools, health)"),
  program('ceph-authtool', 'ceph-common', ['lab-ceph'], "the lab cannot make its Ceph keyrings"),
  program('monmaptool', 'ceph-base', ['lab-ceph'], "the lab cannot make its Ceph monitor map"),
  program('libvirtd', 'libvirt-daemon-system', ['lab-libvirt'], 'the lab cannot start its own libvirtd'),
  program('virtlogd', 'libvirt-daemon-system', ['lab-libvirt'], "the lab's libvirtd has no log daemon for its domains"),
  {
    id: 'file:libvirt-qemu-driver',
    probe: { kind: 'file', path: '/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so' },
    debianPackage: 'libvirt-daemon-driver-qemu',
    neededBy: ['lab-libvirt'],
    withoutIt: "the lab's libvirtd cannot run QEMU domains",
  },

  // Used by the tests alone.
  program('qemu-io', 'qemu-utils', ['tests'], 'the tests cannot write patterns into test images'),
  program('qemu-nbd', 'qemu-utils', ['tests'], 'the NBD client test over TCP has no server'),
  program('qemu-ga', 'qemu-guest-agent', ['tests'], 'the quiesce tests have no real guest agent'),
  program('nbdinfo', 'libnbd-bin', ['tests'], 'the NBD client tests have no reference to compare block status with'),
  program('mkfs.ext4', 'e2fsprogs', ['tests'], 'the full-disk tests cannot make their small filesystem'),
  program('xfs_info', 'xfsprogs', ['tests'], "the lab test cannot confirm the XFS datastore has reflink"),
  program('truncate', 'coreutils', ['tests'], 'the tests cannot make sparse test images'),
  program('dd', 'coreutils', ['tests'], 'the tests cannot fill test images'),
  program('sfdisk', 'fdisk', ['tests'], 'the file-level restore test cannot partition its disks (GPT and MBR)'),
  program('mkswap', 'util-linux', ['tests'], 'the file-level restore test has no swap partition to be refused'),

  // Used by the benchmarks alone.
  program('nbdcopy', 'libnbd-bin', ['tests', 'bench'], 'the NBD server tests have no reference reader, and the regular benchmark no reference read rate'),
  program('restic', 'restic', ['bench'], 'the repository and restore benchmarks have no yardstick'),
  program('borg', 'borgbackup', ['bench'], 'the restore benchmark cannot compare with borg extract'),
  program('du', 'coreutils', ['bench'], "the repository benchmark cannot measure restic's repository size"),
];
