import path from 'node:path';

/** The datastores every lab has: one per storage system the product snapshots. */
export const datastoreKinds = ['btrfs', 'xfs'] as const;
export type DatastoreKind = (typeof datastoreKinds)[number];

export function isDatastoreKind(value: string): value is DatastoreKind {
  return (datastoreKinds as readonly string[]).includes(value);
}

/** Default lab folder, relative to where the command runs (the demo and a user's first try). */
export const defaultLabDir = '.snapshift-lab';

/**
 * Where everything of one lab lives. All paths are absolute and inside the lab folder, so removing a lab
 * never touches anything else (mount points included).
 *
 *   <lab>/lab-state.json           what we made (loop devices, mounts, processes, VMs); written atomically
 *   <lab>/images/<kind>.img        sparse loop files backing the datastores
 *   <lab>/mnt/btrfs                btrfs mount; VM disks in the subvolume vms/, snapshots go to .snapshots/
 *   <lab>/mnt/xfs                  XFS (reflink=1) mount; VM disks in vms/, snapshots go to snaps/
 *   <lab>/images/zfs.img           sparse file of the ZFS pool (when `lab zfs up` made one)
 *   <lab>/mnt/zfs                  the pool's root (zfs-fuse mounts it); VM disks in the dataset <pool>/vms at vms/
 *   <lab>/vms/<name>/              a VM's runtime files: qmp.sock, lab-qmp.sock, ctl.sock, console.log, qemu.log, pid
 *   <lab>/cache/                   guest kernel and initramfs (or $SNAPSHIFT_LAB_CACHE, shared between labs)
 *   <lab>/tmp/                     scratch (the random seed of a new disk, before it becomes qcow2)
 */
export class LabLayout {
  readonly dir: string;
  constructor(dir: string) {
    this.dir = path.resolve(dir);
  }
  get stateFile(): string {
    return path.join(this.dir, 'lab-state.json');
  }
  imageFile(kind: DatastoreKind): string {
    return path.join(this.dir, 'images', `${kind}.img`);
  }
  mountPoint(kind: DatastoreKind): string {
    return path.join(this.dir, 'mnt', kind);
  }
  get zfsImageFile(): string {
    return path.join(this.dir, 'images', 'zfs.img');
  }
  get zfsMountPoint(): string {
    return path.join(this.dir, 'mnt', 'zfs');
  }
  /** Where VM disks go on a datastore (a btrfs subvolume, so it is one snapshot volume). */
  vmDisksDir(kind: DatastoreKind): string {
    return path.join(this.mountPoint(kind), 'vms');
  }
  /** Where storage snapshots of the datastore go. */
  snapshotsDir(kind: DatastoreKind): string {
    return path.join(this.mountPoint(kind), kind === 'btrfs' ? '.snapshots' : 'snaps');
  }
  vmRunDir(name: string): string {
    return path.join(this.dir, 'vms', name);
  }
  get cacheDir(): string {
    const shared = process.env['SNAPSHIFT_LAB_CACHE'];
    return shared ? path.resolve(shared) : path.join(this.dir, 'cache');
  }
  get tmpDir(): string {
    return path.join(this.dir, 'tmp');
  }
}
