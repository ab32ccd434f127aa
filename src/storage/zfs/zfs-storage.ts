import { join, relative } from 'node:path';
import { SnapshiftError } from '../../core/errors.ts';
import { tagOf } from '../btrfs/btrfs-storage.ts';
import { mountOf } from '../fs-info.ts';
import { OwnedStorageSnapshot } from '../owned-snapshot.ts';
import { snapshotPrefix, type StorageSnapshotInfo, type StorageSystem, type Volume } from '../storage-system.ts';
import { destroyWhileBusy, listZfsDatasets, zfs, type ZfsDataset } from './zfs-command.ts';

/** findmnt's type for a ZFS mount: `zfs` from the kernel module, `fuse.zfs` from zfs-fuse (measured). */
const zfsFsTypes = new Set(['zfs', 'fuse.zfs']);
const cloneSuffix = '-clone';

/** A snapshot and the clone that makes it readable. */
interface ClonedSnapshot {
  dataset: string;
  datasetMountpoint: string;
  snapshot: string;
  clone: string;
  cloneMountpoint?: string;
}

/**
 * ZFS: the volume is the dataset that holds the image; a storage snapshot is `zfs snapshot DS@snapshift-<tag>-<n>`
 * (atomic), made readable as a read-only clone `PARENT/snapshift-<tag>-<n>-clone` mounted where ZFS puts it
 * by inheritance, because zfs-fuse has no `.zfs/snapshot` folder. Removal destroys the clone, then the snapshot.
 */
export class ZfsStorage implements StorageSystem {
  readonly kind = 'zfs';

  async locate(imagePath: string): Promise<Volume | undefined> {
    const mount = await mountOf(imagePath);
    if (!mount || !zfsFsTypes.has(mount.fstype)) return undefined;
    const dataset = (await listZfsDatasets()).find((candidate) => candidate.type === 'filesystem' && candidate.mountpoint === mount.target);
    if (!dataset) throw new SnapshiftError('STORAGE_LOCATE_FAILED', `${imagePath} is on the ZFS mount ${mount.target}, but no ZFS dataset has that mountpoint`);
    return { kind: this.kind, id: dataset.name };
  }

  async snapshot(volumes: readonly Volume[], sessionTag: string, _images: readonly string[] = []) {
    const datasets = await listZfsDatasets();
    const created: ClonedSnapshot[] = [];
    try {
      for (const [index, volume] of volumes.entries()) {
        const dataset = datasets.find((candidate) => candidate.name === volume.id);
        if (!dataset?.mountpoint) throw new SnapshiftError('STORAGE_SNAPSHOT_FAILED', `ZFS dataset ${volume.id} is gone or not mounted`);
        const name = `${snapshotPrefix}${sessionTag}-${index}`;
        const item: ClonedSnapshot = { dataset: dataset.name, datasetMountpoint: dataset.mountpoint, snapshot: `${dataset.name}@${name}`, clone: `${parentOf(dataset.name)}/${name}${cloneSuffix}` };
        created.push(item);
        await zfs(['snapshot', item.snapshot], { code: 'STORAGE_SNAPSHOT_FAILED' });
        await zfs(['clone', '-o', 'readonly=on', item.snapshot, item.clone], { code: 'STORAGE_SNAPSHOT_FAILED' });
        item.cloneMountpoint = await mountedAt(item.clone);
      }
    } catch (error) {
      for (const item of created.reverse()) await removeClonedSnapshot(item).catch(() => undefined);
      throw error;
    }
    return new OwnedStorageSnapshot(
      created.map((item) => ({ kind: this.kind, location: item.snapshot, sessionTag })),
      (imagePath) => {
        const holder = created.find((item) => imagePath.startsWith(`${item.datasetMountpoint}/`));
        if (!holder?.cloneMountpoint) throw new SnapshiftError('STORAGE_IMAGE_NOT_IN_SNAPSHOT', `${imagePath} is not on a snapshotted ZFS dataset`);
        return join(holder.cloneMountpoint, relative(holder.datasetMountpoint, imagePath));
      },
      async () => {
        for (const item of [...created].reverse()) await removeClonedSnapshot(item);
      },
    );
  }

  /** Our snapshots of the given datasets; each stands for itself and its clone (a clone cannot outlive it). */
  async listOwnSnapshots(volumes: readonly Volume[]): Promise<StorageSnapshotInfo[]> {
    const ids = new Set(volumes.map((volume) => volume.id));
    return (await listZfsDatasets()).flatMap((item) => {
      const [dataset = '', name = ''] = item.name.split('@');
      const tag = item.type === 'snapshot' && ids.has(dataset) ? tagOf(name) : undefined;
      return tag ? [{ kind: this.kind, location: item.name, sessionTag: tag }] : [];
    });
  }

  /** Destroys our clones of the snapshot, then the snapshot; refuses anything without our name. */
  async removeSnapshot(info: StorageSnapshotInfo): Promise<void> {
    const [dataset = '', name = ''] = info.location.split('@');
    if (!dataset || !tagOf(name)) throw new SnapshiftError('STORAGE_NOT_OURS', `${info.location} is not a snapshift ZFS snapshot; refusing to remove it`);
    const clones = (await listZfsDatasets()).filter((item) => item.origin === info.location);
    const foreign = clones.filter((item) => !isOurClone(item));
    for (const clone of clones.filter(isOurClone)) await destroyWhileBusy(clone.name);
    if (foreign.length > 0) {
      throw new SnapshiftError('STORAGE_SNAPSHOT_REMOVE_FAILED', `cannot remove ${info.location}: clones not made by snapshift depend on it (${foreign.map((item) => item.name).join(', ')})`);
    }
    await destroyWhileBusy(info.location);
  }
}

async function removeClonedSnapshot(item: ClonedSnapshot): Promise<void> {
  await destroyWhileBusy(item.clone);
  await destroyWhileBusy(item.snapshot);
}

/** The clone's mountpoint once ZFS has mounted it; without one the snapshot cannot be read. */
async function mountedAt(dataset: string): Promise<string> {
  const { stdout } = await zfs(['get', '-H', '-o', 'value', 'mountpoint,mounted', dataset], { code: 'STORAGE_SNAPSHOT_FAILED' });
  const [mountpoint = '', mounted = ''] = stdout.trim().split('\n');
  if (!mountpoint.startsWith('/') || mounted !== 'yes') {
    throw new SnapshiftError('STORAGE_SNAPSHOT_FAILED', `ZFS clone ${dataset} is not mounted (mountpoint ${mountpoint || '?'}); give its parent dataset a mountpoint`);
  }
  return mountpoint;
}

/** Where clones go: beside the dataset; beside nothing for a pool's root dataset, so inside it. */
function parentOf(dataset: string): string {
  const slash = dataset.lastIndexOf('/');
  return slash < 0 ? dataset : dataset.slice(0, slash);
}

function isOurClone(item: ZfsDataset): boolean {
  const leaf = item.name.slice(item.name.lastIndexOf('/') + 1);
  return leaf.endsWith(cloneSuffix) && tagOf(leaf.slice(0, -cloneSuffix.length)) !== undefined;
}
