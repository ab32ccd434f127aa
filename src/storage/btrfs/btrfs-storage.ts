import { mkdir, readdir, stat } from 'node:fs/promises';
import { dirname, join, relative } from 'node:path';
import { SnapshiftError } from '../../core/errors.ts';
import { exec } from '../../core/exec.ts';
import { pathExists } from '../../core/fs-probe.ts';
import { mountOf } from '../fs-info.ts';
import { OwnedStorageSnapshot } from '../owned-snapshot.ts';
import { snapshotPrefix, type StorageSnapshotInfo, type StorageSystem, type Volume } from '../storage-system.ts';

/** btrfs gives every subvolume root inode 256 (BTRFS_FIRST_FREE_OBJECTID): how a folder is known as one. */
const subvolumeRootInode = 256;
/** Snapshots go in this folder at the top of the filesystem, so they never nest inside the volume. */
const snapshotFolderName = '.snapshift-snapshots';

/**
 * btrfs: the volume is the subvolume that holds the image; a storage snapshot is a read-only subvolume
 * snapshot of it (atomic, ~20 ms), under `<mount>/.snapshift-snapshots/snapshift-<session>-<n>`.
 */
export class BtrfsStorage implements StorageSystem {
  readonly kind = 'btrfs';

  async locate(imagePath: string): Promise<Volume | undefined> {
    const mount = await mountOf(imagePath);
    if (mount?.fstype !== 'btrfs') return undefined;
    let folder = dirname(imagePath);
    while ((await stat(folder)).ino !== subvolumeRootInode && folder !== mount.target) folder = dirname(folder);
    return { kind: this.kind, id: folder };
  }

  async snapshot(volumes: readonly Volume[], sessionTag: string, _images: readonly string[] = []) {
    const created: Array<{ volume: string; snapshotPath: string }> = [];
    try {
      for (const [index, volume] of volumes.entries()) {
        const folder = await snapshotFolderFor(volume.id);
        if (!folder || !(await pathExists(volume.id))) throw new SnapshiftError('STORAGE_SNAPSHOT_FAILED', `btrfs volume ${volume.id} is gone (no such subvolume); cannot snapshot it`);
        await mkdir(folder, { recursive: true });
        const snapshotPath = join(folder, `${snapshotPrefix}${sessionTag}-${index}`);
        await exec('btrfs', ['subvolume', 'snapshot', '-r', volume.id, snapshotPath], { code: 'STORAGE_SNAPSHOT_FAILED' });
        created.push({ volume: volume.id, snapshotPath });
      }
    } catch (error) {
      await Promise.allSettled(created.map((item) => deleteSubvolume(item.snapshotPath)));
      throw error;
    }
    return new OwnedStorageSnapshot(
      created.map((item) => ({ kind: this.kind, location: item.snapshotPath, sessionTag })),
      (imagePath) => {
        const holder = created.find((item) => imagePath.startsWith(`${item.volume}/`));
        if (!holder) throw new SnapshiftError('STORAGE_IMAGE_NOT_IN_SNAPSHOT', `${imagePath} is not on a snapshotted btrfs volume`);
        return join(holder.snapshotPath, relative(holder.volume, imagePath));
      },
      async () => {
        for (const item of created) await deleteSubvolume(item.snapshotPath);
      },
    );
  }

  async listOwnSnapshots(volumes: readonly Volume[]): Promise<StorageSnapshotInfo[]> {
    const found = new Map<string, StorageSnapshotInfo>();
    for (const volume of volumes) {
      const folder = await snapshotFolderFor(volume.id);
      if (!folder) continue;
      for (const name of await readdir(folder).catch(() => [] as string[])) {
        const tag = tagOf(name);
        if (tag) found.set(join(folder, name), { kind: this.kind, location: join(folder, name), sessionTag: tag });
      }
    }
    return [...found.values()];
  }

  async removeSnapshot(info: StorageSnapshotInfo): Promise<void> {
    await deleteSubvolume(info.location);
  }
}

/**
 * Our snapshot folder on the btrfs filesystem that holds (or held) `volumePath`; undefined when no btrfs holds
 * it any more. A subvolume deleted since keeps its snapshots in that folder, so we look from its nearest
 * existing parent (findmnt finds no mount for a path that does not exist).
 */
async function snapshotFolderFor(volumePath: string): Promise<string | undefined> {
  let existing = volumePath;
  while (!(await pathExists(existing)) && existing !== dirname(existing)) existing = dirname(existing);
  const mount = await mountOf(existing);
  return mount?.fstype === 'btrfs' ? join(mount.target, snapshotFolderName) : undefined;
}

async function deleteSubvolume(path: string): Promise<void> {
  await exec('btrfs', ['subvolume', 'delete', path], { code: 'STORAGE_SNAPSHOT_REMOVE_FAILED' });
}

/** `snapshift-<tag>-<n>` → tag; anything else is not ours. */
export function tagOf(name: string): string | undefined {
  return name.match(/^snapshift-([0-9a-f]{8})-\d+$/)?.[1];
}
