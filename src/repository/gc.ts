import { performance } from 'node:perf_hooks';
import { SnapshiftError } from '../core/errors.ts';
import { faultPoint } from '../core/fault-points.ts';
import type { Repository } from './repository.ts';
import { PackWriter } from './pack-writer.ts';
import { readPackTrailer, type BlobEntry } from './pack-format.ts';
import { markLiveChunks } from './live-chunks.ts';
import { tempFileOwnerIsGone } from './temp-files.ts';

export interface GcOptions {
  /** Unindexed packs and temp files younger than this are left alone (a writer may still own them). */
  safetyWindowMs?: number;
  /** A pack whose unreferenced bytes exceed this share is repacked. */
  repackThreshold?: number;
  dryRun?: boolean;
}

export interface GcReport {
  packsBefore: number;
  packsDeleted: number;
  packsRepacked: number;
  packsWritten: number;
  unindexedDeleted: number;
  bytesBefore: number;
  bytesAfter: number;
  bytesRepacked: number;
  durationMs: number;
}

export const defaultSafetyWindowMs = 60 * 60 * 1000;

/** Mark and sweep (docs/FORMAT.md § gc), under an exclusive lock. */
export async function collectGarbage(repository: Repository, opts: GcOptions = {}): Promise<GcReport> {
  const started = performance.now();
  const safetyWindowMs = opts.safetyWindowMs ?? defaultSafetyWindowMs;
  const threshold = opts.repackThreshold ?? 0.5;
  await using _lock = await repository.lock('exclusive', 'gc');
  await repository.loadIndex();
  const live = await markLiveChunks(repository);
  if (live.damagedManifests.length > 0) {
    throw new SnapshiftError('REPO_GC_REFUSED', `gc refused: ${live.damagedManifests.length} manifest(s) cannot be read (${live.damagedManifests[0]!.reason}); deleting data they may name would be unsafe. Forget those restore points first.`);
  }
  if (live.missing.size > 0) {
    throw new SnapshiftError('REPO_GC_REFUSED', `gc refused: ${live.missing.size} referenced chunk(s) have no index entry (e.g. ${live.missing.keys().next().value}); run "snapshift check"`);
  }
  const files = new Map((await repository.backend.list('data')).map((e) => [e.name.split('/').at(-1)!, e]));
  const bytesBefore = [...files.values()].reduce((sum, e) => sum + e.sizeBytes, 0);
  const oldIndexFiles = [...repository.indexFiles];
  const toDelete: string[] = [];
  const toRepack: number[] = [];
  const kept: Array<{ packId: string; blobs: BlobEntry[] }> = [];
  for (const [packNo, packId] of repository.packIds.entries()) {
    const file = files.get(packId);
    const liveChunks = live.byPack.get(packNo) ?? [];
    if (!file) {
      if (liveChunks.length > 0) throw new SnapshiftError('REPO_GC_REFUSED', `gc refused: pack ${repository.packPathOf(packNo)} holds referenced chunks but is missing; run "snapshift check"`);
      continue;
    }
    const liveBytes = liveChunks.reduce((sum, c) => sum + c.location.storedLength, 0);
    if (liveChunks.length === 0) toDelete.push(repository.packPathOf(packNo));
    else if (1 - liveBytes / file.sizeBytes > threshold) toRepack.push(packNo);
    else kept.push({ packId, blobs: liveChunks.map((c) => ({ id: c.id, offsetBytes: c.location.offsetBytes, storedLength: c.location.storedLength, rawLength: 0, compressed: c.location.compressed })) });
  }
  const unindexed = [...files.values()].filter((e) => !repository.packNoOf.has(e.name.split('/').at(-1)!) && Date.now() - e.modifiedMs > safetyWindowMs);
  const oldTemp = (await repository.backend.list('tmp')).filter((e) => tempFileOwnerIsGone(e.name) || Date.now() - e.modifiedMs > safetyWindowMs);
  const report: GcReport = { packsBefore: files.size, packsDeleted: toDelete.length, packsRepacked: toRepack.length, packsWritten: 0, unindexedDeleted: unindexed.length, bytesBefore, bytesAfter: bytesBefore, bytesRepacked: 0, durationMs: 0 };
  if (opts.dryRun) {
    report.durationMs = performance.now() - started;
    return report;
  }

  // Repack: copy live blobs as stored (same keys, same id as associated data: no re-encryption).
  const written: Array<{ packId: string; blobs: BlobEntry[] }> = [];
  const packWriter = new PackWriter(repository.backend, repository.keys, repository.config.packTargetBytes, (packId, blobs) => void written.push({ packId, blobs }));
  try {
    for (const packNo of toRepack) {
      const name = repository.packPathOf(packNo);
      const whole = await repository.backend.get(name);
      const rawLengths = new Map<string, number>();
      for (const blob of await readPackTrailer(repository.keys, name, whole.length, async (o, l) => whole.subarray(o, o + l)).catch(() => [])) rawLengths.set(blob.id.toString('hex'), blob.rawLength);
      for (const chunk of live.byPack.get(packNo)!) {
        const { offsetBytes, storedLength, compressed } = chunk.location;
        await packWriter.add(chunk.id, [Buffer.from(whole.subarray(offsetBytes, offsetBytes + storedLength))], storedLength, rawLengths.get(chunk.id.toString('hex')) ?? 0, compressed);
        report.bytesRepacked += storedLength;
      }
      toDelete.push(name);
    }
    await packWriter.flush();
  } catch (error) {
    await packWriter.abort();
    throw error;
  }
  report.packsWritten = written.length;

  // The new complete index goes first; only then do old index files and packs go (a crash in between
  // leaves duplicates, never a referenced chunk without an entry).
  const all = [...kept, ...written];
  for (let at = 0; at < all.length || at === 0; at += 256) await repository.writeIndexFile(all.slice(at, at + 256));
  faultPoint('gc.after-new-index');
  for (const name of oldIndexFiles) await repository.backend.delete(name);
  for (const name of toDelete) {
    await repository.backend.delete(name);
    faultPoint('gc.mid-sweep');
  }
  for (const entry of unindexed) await repository.backend.delete(entry.name);
  for (const entry of oldTemp) await repository.backend.delete(entry.name);
  await repository.loadIndex();
  report.bytesAfter = (await repository.backend.list('data')).reduce((sum, e) => sum + e.sizeBytes, 0);
  report.durationMs = performance.now() - started;
  return report;
}
