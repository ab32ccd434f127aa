import { describe } from 'node:test';
import { mkdirSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { messageOf } from '../../src/core/errors.ts';
import { withZfs } from '../../src/lab/index.ts';
import { listZfsDatasets, zfs } from '../../src/storage/zfs/zfs-command.ts';
import { ZfsStorage } from '../../src/storage/zfs/zfs-storage.ts';
import { describeStorageConformance, makeRawFile, writeFilePattern } from '../support/storage-conformance.ts';

/** Our snapshots and clones (`snapshift-<tag>-<n>`, `…-clone`); the lab's pool is called snapshift-lab-…, not ours to count. */
const ourName = /snapshift-[0-9a-f]{8}-\d+/;

describe('storage conformance on the lab ZFS datastore (zfs-fuse)', () => {
  const lab = withZfs();
  let userSnapshots = 0;
  let vanishing = 0;

  async function placeImage(folder: string, name: string, sizeBytes: number): Promise<string> {
    const imagePath = join(folder, name.endsWith('.raw') ? name : `${name}.raw`);
    await makeRawFile(imagePath, sizeBytes);
    return imagePath;
  }

  /** `zfs destroy -R`, as a user removes a dataset with what depends on it; retried while zfs-fuse says busy. */
  async function destroyRecursively(dataset: string): Promise<void> {
    const deadline = Date.now() + 20_000;
    for (;;) {
      try {
        await zfs(['destroy', '-R', dataset]);
        return;
      } catch (error) {
        if (!/busy/.test(messageOf(error)) || Date.now() >= deadline) throw error;
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
    }
  }

  describeStorageConformance({
    name: 'zfs',
    system: () => new ZfsStorage(),
    async makeImage(name, sizeBytes, options = {}) {
      const { dataset, vmDisksDir } = lab().zfs;
      if (!options.deep) return placeImage(vmDisksDir, name, sizeBytes);
      // A child dataset (the volume then) and an odd, deep folder inside it.
      const tenants = `${dataset}/tenants`;
      if (!(await listZfsDatasets()).some((item) => item.name === tenants)) await zfs(['create', tenants]);
      const folder = join(vmDisksDir, 'tenants', 'acme corp.eu-west', 'vm-0001', 'disks');
      mkdirSync(folder, { recursive: true });
      return placeImage(folder, name, sizeBytes);
    },
    makeForeignImage: (name, scratchDir) => placeImage(scratchDir, name, 1024 * 1024),
    writePattern: writeFilePattern,
    readablePath: (imagePath) => imagePath,
    async userSnapshot(imagePath) {
      const volume = await new ZfsStorage().locate(imagePath);
      const location = `${volume!.id}@users-own-${userSnapshots++}`;
      await zfs(['snapshot', location]);
      return {
        location,
        exists: async () => (await listZfsDatasets()).some((item) => item.name === location),
        remove: async () => void (await zfs(['destroy', location])),
      };
    },
    async ownLeftovers() {
      const { mountPoint, vmDisksDir } = lab().zfs;
      const datasets = (await listZfsDatasets()).map((item) => item.name).filter((name) => ourName.test(name));
      // A clone's mountpoint folder left behind after the clone was destroyed is ours too.
      const folders = [mountPoint, vmDisksDir].flatMap((folder) => readdirSync(folder).filter((name) => ourName.test(name)).map((name) => join(folder, name)));
      return [...datasets, ...folders].sort();
    },
    async makeVanishingVolume() {
      const { dataset, vmDisksDir } = lab().zfs;
      const name = `vanishing-${vanishing++}`;
      await zfs(['create', `${dataset}/${name}`]);
      const imagePath = await placeImage(join(vmDisksDir, name), 'disk', 1024 * 1024);
      const volume = (await new ZfsStorage().locate(imagePath))!;
      return { volume, imagePath, name: `${dataset}/${name}`, vanish: () => destroyRecursively(`${dataset}/${name}`) };
    },
    imagesCutTogether: true,
  });
});
