import type { Catalog } from '../catalog/index.ts';
import { messageOf } from '../core/errors.ts';
import { locateImage, storageSystems } from '../storage/registry.ts';
import type { StorageSnapshotInfo, StorageSystem, Volume } from '../storage/storage-system.ts';
import { snapshiftProcessIsAlive } from '../core/process-alive.ts';
import { liveSessionTags } from './snapshot-hunter.ts';

export interface StorageHuntAction {
  kind: string;
  location: string;
  action: 'removed' | 'failed';
  detail: string;
}

/**
 * Finds storage snapshots we created that belong to no running task and removes them: those named in ledger
 * rows whose owner is gone, and any `snapshift-<tag>-…` snapshot on a volume we back up from whose tag is no
 * live task's, and retained changed-block bases (`snapshift-cbt-<tag>`) no restore point in the catalog refers
 * to. Snapshots without our prefix (a user's own) are never listed, so never touched.
 */
export async function huntStorageSnapshots(
  catalog: Catalog,
  options: { dryRun?: boolean; systems?: readonly StorageSystem[]; /** Sessions of this process whose task failed: their snapshots go too. */ forceSessionTags?: readonly string[] } = {},
): Promise<StorageHuntAction[]> {
  const systems = options.systems ?? storageSystems();
  const ledger = catalog.listStorageSnapshotLedger();
  const liveTags = liveSessionTags(catalog);
  for (const tag of options.forceSessionTags ?? []) liveTags.delete(tag);
  const isOrphan = (entry: { ownerPid: number; sessionTag: string }) => !snapshiftProcessIsAlive(entry.ownerPid) || (options.forceSessionTags ?? []).includes(entry.sessionTag);

  // Volumes to look at: those in the ledger and those holding any disk we have backed up.
  const volumesBySystem = new Map<StorageSystem, Map<string, Volume>>();
  const addVolume = (system: StorageSystem, volume: Volume) => {
    const volumes = volumesBySystem.get(system) ?? new Map<string, Volume>();
    volumes.set(volume.id, volume);
    volumesBySystem.set(system, volumes);
  };
  for (const entry of ledger) {
    const system = systems.find((candidate) => candidate.kind === entry.systemKind);
    if (system) for (const volume of entry.volumes) addVolume(system, volume);
  }
  for (const imagePath of catalog.knownImagePaths()) {
    const where = await locateImage(imagePath, systems).catch(() => undefined);
    if (where) addVolume(where.system, where.volume);
  }

  const actions: StorageHuntAction[] = [];
  const removed = new Set<string>();
  for (const [system, volumes] of volumesBySystem) {
    let own: StorageSnapshotInfo[];
    try {
      own = await system.listOwnSnapshots([...volumes.values()]);
    } catch (error) {
      actions.push({ kind: system.kind, location: [...volumes.keys()].join(', '), action: 'failed', detail: `cannot list snapshots: ${messageOf(error)}` });
      continue;
    }
    // Retained CBT bases are kept while a restore point refers to them; one nothing refers to is dead weight.
    const unreferencedBases = new Set<string>();
    if (system.listRetainedSnapshots) {
      try {
        const referenced = retainedSnapshotReferences(catalog);
        for (const snapshot of await system.listRetainedSnapshots([...volumes.values()])) {
          if (referenced.has(snapshot.location)) continue;
          own.push(snapshot);
          unreferencedBases.add(snapshot.location);
        }
      } catch (error) {
        actions.push({ kind: system.kind, location: [...volumes.keys()].join(', '), action: 'failed', detail: `cannot list retained snapshots: ${messageOf(error)}` });
      }
    }
    for (const snapshot of own) {
      if (liveTags.has(snapshot.sessionTag) || removed.has(snapshot.location)) continue;
      try {
        if (!options.dryRun) await system.removeSnapshot(snapshot);
        removed.add(snapshot.location);
        const detail = unreferencedBases.has(snapshot.location)
          ? `changed-block base kept by session ${snapshot.sessionTag}, which no restore point in the catalog refers to`
          : `left by session ${snapshot.sessionTag}, which is no longer running`;
        actions.push({ kind: system.kind, location: snapshot.location, action: 'removed', detail });
      } catch (error) {
        actions.push({ kind: system.kind, location: snapshot.location, action: 'failed', detail: messageOf(error) });
      }
    }
  }
  if (!options.dryRun) {
    for (const entry of ledger) {
      if (isOrphan(entry) && !actions.some((action) => action.action === 'failed')) catalog.clearLedgerEntry(entry.id);
    }
  }
  return actions;
}

/** Every retained storage snapshot a restore point in the catalog names (`stats.retainedSnapshots`). */
function retainedSnapshotReferences(catalog: Catalog): Set<string> {
  const referenced = new Set<string>();
  for (const point of catalog.listRestorePoints()) {
    const locations = point.stats['retainedSnapshots'];
    if (Array.isArray(locations)) for (const location of locations) if (typeof location === 'string') referenced.add(location);
  }
  return referenced;
}
