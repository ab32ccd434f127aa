import { describe } from 'node:test';
import { existsSync, mkdirSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { exec } from '../../src/core/exec.ts';
import { withLab } from '../../src/lab/index.ts';
import { BtrfsStorage } from '../../src/storage/btrfs/btrfs-storage.ts';
import { XfsStorage } from '../../src/storage/xfs/xfs-storage.ts';
import { describeStorageConformance, makeRawFile, writeFilePattern, type StorageBed } from '../support/storage-conformance.ts';

/** Where the providers keep their snapshots (btrfs subvolumes, XFS reflink-copy folders), at the top of the filesystem. */
const ownFolderName = '.snapshift-snapshots';

describe('storage conformance on the lab datastores (btrfs, XFS on loop devices)', () => {
  const lab = withLab();
  let userSnapshots = 0;
  let vanishing = 0;

  /** A deep path with a space, dots and dashes; on btrfs its middle is a nested subvolume (the volume then). */
  async function deepFolder(root: string, nestedSubvolume: boolean): Promise<string> {
    const top = join(root, 'tenants', 'acme corp.eu-west');
    mkdirSync(top, { recursive: true });
    const nested = join(top, 'nested.volume');
    if (nestedSubvolume && !existsSync(nested)) await exec('btrfs', ['subvolume', 'create', nested]);
    const folder = join(nested, 'vm-0001', 'disks');
    mkdirSync(folder, { recursive: true });
    return folder;
  }

  async function placeImage(folder: string, name: string, sizeBytes: number): Promise<string> {
    const imagePath = join(folder, name.endsWith('.raw') ? name : `${name}.raw`);
    await makeRawFile(imagePath, sizeBytes);
    return imagePath;
  }

  /** Entries in our folder at the top of the filesystem, and (btrfs) any subvolume with our name. */
  async function ownEntries(mountPoint: string, btrfs: boolean): Promise<string[]> {
    const folder = join(mountPoint, ownFolderName);
    const found = new Set(existsSync(folder) ? readdirSync(folder).map((name) => join(folder, name)) : []);
    if (btrfs) {
      const { stdout } = await exec('btrfs', ['subvolume', 'list', mountPoint]);
      for (const line of stdout.split('\n')) {
        const path = line.match(/ path (.*)$/)?.[1];
        if (path && /(^|\/)snapshift-/.test(path)) found.add(join(mountPoint, path));
      }
    }
    return [...found].sort();
  }

  const btrfsBed: StorageBed = {
    name: 'btrfs',
    system: () => new BtrfsStorage(),
    async makeImage(name, sizeBytes, options = {}) {
      const { vmDisksDir } = lab().datastore('btrfs');
      return placeImage(options.deep ? await deepFolder(vmDisksDir, true) : vmDisksDir, name, sizeBytes);
    },
    // On the other lab filesystem: a btrfs provider must not take XFS for its own.
    makeForeignImage: (name) => placeImage(lab().datastore('xfs').vmDisksDir, `btrfs-foreign-${name}`, 1024 * 1024),
    writePattern: writeFilePattern,
    readablePath: (imagePath) => imagePath,
    async userSnapshot(imagePath) {
      const { snapshotsDir } = lab().datastore('btrfs');
      const volume = await new BtrfsStorage().locate(imagePath);
      const location = join(snapshotsDir, `users-own-${userSnapshots++}`);
      await exec('btrfs', ['subvolume', 'snapshot', '-r', volume!.id, location]);
      return {
        location,
        exists: async () => existsSync(imagePath.replace(volume!.id, location)),
        remove: async () => void (await exec('btrfs', ['subvolume', 'delete', location])),
      };
    },
    ownLeftovers: () => ownEntries(lab().datastore('btrfs').mountPoint, true),
    async makeVanishingVolume() {
      const volumePath = join(lab().datastore('btrfs').mountPoint, `vanishing-${vanishing++}`);
      await exec('btrfs', ['subvolume', 'create', volumePath]);
      const imagePath = await placeImage(volumePath, 'disk', 1024 * 1024);
      const volume = (await new BtrfsStorage().locate(imagePath))!;
      return { volume, imagePath, name: volumePath, vanish: async () => void (await exec('btrfs', ['subvolume', 'delete', volumePath])) };
    },
    imagesCutTogether: true,
  };

  const xfsBed: StorageBed = {
    name: 'xfs',
    system: () => new XfsStorage(),
    async makeImage(name, sizeBytes, options = {}) {
      const { vmDisksDir } = lab().datastore('xfs');
      return placeImage(options.deep ? await deepFolder(vmDisksDir, false) : vmDisksDir, name, sizeBytes);
    },
    makeForeignImage: (name) => placeImage(lab().datastore('btrfs').vmDisksDir, `xfs-foreign-${name}`, 1024 * 1024),
    writePattern: writeFilePattern,
    readablePath: (imagePath) => imagePath,
    async userSnapshot(imagePath) {
      const location = join(lab().datastore('xfs').snapshotsDir, `users-copy-${userSnapshots++}.raw`);
      await exec('cp', ['--reflink=always', imagePath, location]);
      return { location, exists: async () => existsSync(location), remove: async () => rmSync(location) };
    },
    ownLeftovers: () => ownEntries(lab().datastore('xfs').mountPoint, false),
    // The volume is the filesystem, which cannot vanish under a test; an image that vanished is what can.
    async makeVanishingVolume() {
      const imagePath = await placeImage(lab().datastore('xfs').vmDisksDir, `vanishing-${vanishing++}`, 1024 * 1024);
      const volume = (await new XfsStorage().locate(imagePath))!;
      return { volume, imagePath, name: imagePath, vanish: async () => rmSync(imagePath) };
    },
    imagesCutTogether: 'XFS clones image by image (cp --reflink), not the filesystem at once: the VM snapshot holding the bases still is what makes several images one instant',
  };

  describeStorageConformance(btrfsBed);
  describeStorageConformance(xfsBed);
});
