import { performance } from 'node:perf_hooks';
import { SnapshiftError } from '../core/errors.ts';
import type { Repository, SealedPack } from './repository.ts';
import { decodeIndexFile, readPackTrailer, type BlobEntry } from './pack-format.ts';

export interface RepairIndexReport {
  /** Packs found in data/. */
  packsRead: number;
  /** Packs the new index lists. */
  packsIndexed: number;
  chunksIndexed: number;
  indexFilesWritten: number;
  indexFilesRemoved: number;
  /** Packs whose trailer cannot be read: left in place, never deleted. */
  damagedPacks: Array<{ pack: string; reason: string; keptFromOldIndex: boolean }>;
  durationMs: number;
}

/** Packs per index file of a rebuilt index (as gc writes them). */
const packsPerFile = 256;

/**
 * Rebuilds the index from the pack trailers (docs/FORMAT.md § Index files, repair-index), under an exclusive
 * lock: every pack in data/ is read by its trailer; the new index files are written first, the old ones are
 * removed only after. A pack whose trailer cannot be read is reported and left alone; if an old index file
 * that can still be read lists it, its entries are carried over (the blobs may well be intact).
 */
export async function repairIndex(repository: Repository): Promise<RepairIndexReport> {
  const started = performance.now();
  await using _lock = await repository.lock('exclusive', 'repair-index');
  const oldIndexFiles = (await repository.backend.list('index')).map((entry) => entry.name);
  const packFiles = (await repository.backend.list('data')).filter((entry) => /^data\/[0-9a-f]{2}\/[0-9a-f]{64}$/.test(entry.name));
  const report: RepairIndexReport = { packsRead: packFiles.length, packsIndexed: 0, chunksIndexed: 0, indexFilesWritten: 0, indexFilesRemoved: 0, damagedPacks: [], durationMs: 0 };
  const written: string[] = [];
  let batch: SealedPack[] = [];
  const add = async (pack: SealedPack): Promise<void> => {
    batch.push(pack);
    report.packsIndexed++;
    report.chunksIndexed += pack.blobs.length;
    if (batch.length >= packsPerFile) await flush();
  };
  const flush = async (): Promise<void> => {
    if (batch.length === 0) return;
    written.push(await repository.writeIndexFile(batch));
    batch = [];
  };
  const damaged: Array<{ pack: string; packId: string; reason: string }> = [];
  for (const entry of packFiles) {
    const packId = entry.name.split('/').at(-1)!;
    try {
      await add({ packId, blobs: await readPackTrailer(repository.keys, entry.name, entry.sizeBytes, (offset, length) => repository.backend.getRange(entry.name, offset, length)) });
    } catch (error) {
      if (!(error instanceof SnapshiftError)) throw error;
      damaged.push({ pack: entry.name, packId, reason: error.message });
    }
  }
  if (damaged.length > 0) {
    const fromOldIndex = await oldEntriesOf(repository, oldIndexFiles, new Set(damaged.map((d) => d.packId)));
    for (const pack of damaged) {
      const blobs = fromOldIndex.get(pack.packId);
      if (blobs) await add({ packId: pack.packId, blobs });
      report.damagedPacks.push({ pack: pack.pack, reason: pack.reason, keptFromOldIndex: blobs !== undefined });
    }
  }
  await flush();
  report.indexFilesWritten = written.length;
  // Only now, with the new index complete on disk, do the old files go: a crash before leaves duplicates.
  for (const name of oldIndexFiles) {
    await repository.backend.delete(name);
    report.indexFilesRemoved++;
  }
  await repository.loadIndex();
  report.durationMs = performance.now() - started;
  return report;
}

/** Entries that old index files (those that can still be read) list for `packIds`. */
async function oldEntriesOf(repository: Repository, indexFiles: readonly string[], packIds: ReadonlySet<string>): Promise<Map<string, BlobEntry[]>> {
  const result = new Map<string, BlobEntry[]>();
  for (const name of indexFiles) {
    let packs: SealedPack[];
    try {
      packs = decodeIndexFile(repository.keys, await repository.backend.get(name), name).packs;
    } catch (error) {
      if (!(error instanceof SnapshiftError)) throw error;
      continue;
    }
    for (const pack of packs) {
      if (!packIds.has(pack.packId)) continue;
      const known = result.get(pack.packId) ?? [];
      const seen = new Set(known.map((blob) => blob.id.toString('hex')));
      result.set(pack.packId, [...known, ...pack.blobs.filter((blob) => !seen.has(blob.id.toString('hex')))]);
    }
  }
  return result;
}
