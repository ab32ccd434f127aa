import { SnapshiftError } from '../core/errors.ts';
import { ChunkIndex, type BlobLocation } from './chunk-index.ts';
import { readManifest, zeroId } from './manifest.ts';
import type { Repository } from './repository.ts';

export interface LiveChunk {
  id: Buffer;
  location: BlobLocation;
}

export interface LiveChunks {
  /** Referenced chunks grouped by pack number. */
  byPack: Map<number, LiveChunk[]>;
  /** Referenced ids with no index entry, and the restore points naming them. */
  missing: Map<string, Set<string>>;
  /** Manifests that could not be read. */
  damagedManifests: Array<{ id: string; reason: string }>;
  restorePoints: number;
}

/** Marks every chunk any manifest names (the "mark" of gc, the reference walk of check). */
export async function markLiveChunks(repository: Repository): Promise<LiveChunks> {
  const seen = new ChunkIndex();
  const result: LiveChunks = { byPack: new Map(), missing: new Map(), damagedManifests: [], restorePoints: 0 };
  for (const id of await repository.restorePointIds()) {
    let maps: Buffer[];
    try {
      maps = (await readManifest(repository.backend, repository.keys, id)).maps;
    } catch (error) {
      if (!(error instanceof SnapshiftError)) throw error;
      result.damagedManifests.push({ id, reason: error.message });
      continue;
    }
    result.restorePoints++;
    for (const map of maps) {
      for (let at = 0; at < map.length; at += 32) {
        if (map.compare(zeroId, 0, 32, at, at + 32) === 0) continue;
        const chunkId = map.subarray(at, at + 32);
        const location = repository.index.get(chunkId);
        if (!location) {
          const key = chunkId.toString('hex');
          const points = result.missing.get(key) ?? new Set<string>();
          points.add(id);
          result.missing.set(key, points);
          continue;
        }
        if (!seen.add(chunkId, location)) continue;
        let list = result.byPack.get(location.packNo);
        if (!list) result.byPack.set(location.packNo, (list = []));
        list.push({ id: Buffer.from(chunkId), location });
      }
    }
  }
  return result;
}

/** Which restore points name any of `chunkIds` (hex): read only when damage was found. */
export async function restorePointsNaming(repository: Repository, chunkIds: ReadonlySet<string>): Promise<Map<string, Set<string>>> {
  const result = new Map<string, Set<string>>();
  if (chunkIds.size === 0) return result;
  for (const id of await repository.restorePointIds()) {
    let maps: Buffer[];
    try {
      maps = (await readManifest(repository.backend, repository.keys, id)).maps;
    } catch {
      continue;
    }
    for (const map of maps) {
      for (let at = 0; at < map.length; at += 32) {
        const key = map.subarray(at, at + 32).toString('hex');
        if (!chunkIds.has(key)) continue;
        const points = result.get(key) ?? new Set<string>();
        points.add(id);
        result.set(key, points);
      }
    }
  }
  return result;
}
