import { mkdir, readdir, rm } from 'node:fs/promises';
import { dirname, join, relative } from 'node:path';
import { SnapshiftError } from '../../core/errors.ts';
import { exec } from '../../core/exec.ts';
import { tagOf } from '../btrfs/btrfs-storage.ts';
import { mountOf } from '../fs-info.ts';
import { OwnedStorageSnapshot } from '../owned-snapshot.ts';
import { snapshotPrefix, type StorageSnapshotInfo, type StorageSystem, type Volume } from '../storage-system.ts';

const snapshotFolderName = '.snapshift-snapshots';

/**
 * XFS with reflink: the volume is the filesystem; a storage snapshot is a folder of reflink clones of the
 * images we were asked for (`cp --reflink=always`, a few ms each), taken while the VM snapshot holds the
 * bases still, so the set is consistent. Clones share blocks with the originals until either is written.
 */
export class XfsStorage implements StorageSystem {
  readonly kind = 'xfs';

  async locate(imagePath: string): Promise<Volume | undefined> {
    const mount = await mountOf(imagePath);
    if (mount?.fstype !== 'xfs') return undefined;
    return { kind: this.kind, id: mount.target };
  }

  /** XFS snapshots files, not whole filesystems: the caller names the images through `images`. */
  async snapshot(volumes: readonly Volume[], sessionTag: string, images: readonly string[] = []) {
    const snapshotPaths: string[] = [];
    const clones = new Map<string, string>();
    try {
      for (const [index, volume] of volumes.entries()) {
        const snapshotPath = join(volume.id, snapshotFolderName, `${snapshotPrefix}${sessionTag}-${index}`);
        await mkdir(snapshotPath, { recursive: true });
        snapshotPaths.push(snapshotPath);
        for (const image of images.filter((candidate) => candidate.startsWith(`${volume.id}/`))) {
          const clone = join(snapshotPath, relative(volume.id, image));
          await mkdir(dirname(clone), { recursive: true });
          await exec('cp', ['--reflink=always', '--preserve=mode', image, clone], { code: 'STORAGE_SNAPSHOT_FAILED' });
          clones.set(image, clone);
        }
      }
    } catch (error) {
      await Promise.allSettled(snapshotPaths.map((path) => rm(path, { recursive: true, force: true })));
      throw error;
    }
    return new OwnedStorageSnapshot(
      snapshotPaths.map((location) => ({ kind: this.kind, location, sessionTag })),
      (imagePath) => {
        const clone = clones.get(imagePath);
        if (!clone) throw new SnapshiftError('STORAGE_IMAGE_NOT_IN_SNAPSHOT', `${imagePath} was not cloned into the XFS snapshot`);
        return clone;
      },
      async () => {
        for (const path of snapshotPaths) await rm(path, { recursive: true, force: true });
      },
    );
  }

  async listOwnSnapshots(volumes: readonly Volume[]): Promise<StorageSnapshotInfo[]> {
    const found = new Map<string, StorageSnapshotInfo>();
    for (const volume of volumes) {
      const folder = join(volume.id, snapshotFolderName);
      for (const name of await readdir(folder).catch(() => [] as string[])) {
        const tag = tagOf(name);
        if (tag) found.set(join(folder, name), { kind: this.kind, location: join(folder, name), sessionTag: tag });
      }
    }
    return [...found.values()];
  }

  async removeSnapshot(info: StorageSnapshotInfo): Promise<void> {
    if (!info.location.includes(`/${snapshotFolderName}/${snapshotPrefix}`)) {
      throw new SnapshiftError('STORAGE_NOT_OURS', `${info.location} is not a snapshift snapshot folder; refusing to remove it`);
    }
    await rm(info.location, { recursive: true, force: true });
  }
}
