import { BtrfsStorage } from './btrfs/btrfs-storage.ts';
import { CephRbdStorage } from './ceph-rbd/ceph-rbd-storage.ts';
import type { StorageSystem, Volume } from './storage-system.ts';
import { XfsStorage } from './xfs/xfs-storage.ts';
import { ZfsStorage } from './zfs/zfs-storage.ts';

/** Every storage system snapshift knows; adding one is one line here and its own folder. */
export function storageSystems(): StorageSystem[] {
  return [new BtrfsStorage(), new XfsStorage(), new ZfsStorage(), new CephRbdStorage()];
}

export interface LocatedImage {
  imagePath: string;
  system: StorageSystem;
  volume: Volume;
}

/** Which system and volume hold `imagePath`, trying each system in turn; undefined when none does. */
export async function locateImage(imagePath: string, systems: readonly StorageSystem[] = storageSystems()): Promise<LocatedImage | undefined> {
  for (const system of systems) {
    const volume = await system.locate(imagePath);
    if (volume) return { imagePath, system, volume };
  }
  return undefined;
}
