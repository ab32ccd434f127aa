import { tempFileOwnerIsLive } from './temp-files.ts';
import { performance } from 'node:perf_hooks';
import { SnapshiftError } from '../core/errors.ts';
import type { Repository } from './repository.ts';
import type { BackendEntry } from './backend/storage-backend.ts';
import { decodeIndexFile, packLayoutProblem, packPath, readPackTail, type BlobEntry, type IndexFileContent } from './pack-format.ts';
import { markLiveChunks, restorePointsNaming, type LiveChunk } from './live-chunks.ts';

export interface CheckProblem {
  kind: 'index-damaged' | 'index-mismatch' | 'manifest-damaged' | 'pack-missing' | 'pack-damaged' | 'chunk-missing' | 'chunk-damaged';
  message: string;
  chunkId?: string;
  pack?: string;
  /** Restore points that cannot be fully restored because of this problem. */
  restorePoints: string[];
}

export interface CheckReport {
  problems: CheckProblem[];
  warnings: string[];
  restorePoints: number;
  packs: number;
  chunksVerified: number;
  bytesVerified: number;
  durationMs: number;
}

/** Trailers read at once while comparing an index file with them (each read is a few KiB). */
const trailerReadsInFlight = 8;

/**
 * Checks a repository's structure (config, key, index files, manifests, pack trailers and their layout, the
 * index files against the trailers, every referenced chunk indexed); with `readDataPercent`, also decrypts
 * and re-hashes the referenced chunks of that share of packs. Never changes the repository (a read-only one
 * is checked without a lock; `onWarning` says so).
 */
export async function checkRepository(repository: Repository, opts: { readDataPercent?: number; onWarning?: (message: string) => void } = {}): Promise<CheckReport> {
  const started = performance.now();
  await using _lock = await repository.lockForReading('check', opts.onWarning);
  await repository.loadIndex();
  const problems: CheckProblem[] = [];
  const warnings: string[] = [];
  for (const damaged of repository.damagedIndexFiles) {
    problems.push({ kind: 'index-damaged', message: `${damaged.reason}; its packs were read from their trailers instead (gc rewrites the index)`, restorePoints: [] });
  }
  const live = await markLiveChunks(repository);
  for (const damaged of live.damagedManifests) {
    problems.push({ kind: 'manifest-damaged', message: `${damaged.reason}: restore point ${damaged.id} cannot be restored (forget it)`, restorePoints: [damaged.id] });
  }
  for (const [chunkId, points] of live.missing) {
    problems.push({ kind: 'chunk-missing', chunkId, message: `chunk ${chunkId} is missing (no index entry)`, restorePoints: [...points] });
  }

  // Readers look for a pack only at data/<first 2 hex of its id>/<id>: a file anywhere else is not a pack.
  const packFiles = new Map<string, BackendEntry>();
  for (const entry of await repository.backend.list('data')) {
    const packId = entry.name.split('/').at(-1)!;
    if (/^[0-9a-f]{64}$/.test(packId) && entry.name === packPath(packId)) packFiles.set(packId, entry);
    else warnings.push(`${entry.name} is not where a pack is stored (data/<first 2 hex digits of the pack id>/<64 hex digits>): no reader sees it`);
  }
  const badIds = new Map<string, CheckProblem>();
  // Read once per pack, and a damaged trailer reported once, whichever pass reads it first.
  const trailersRead = new Set<string>();
  const readTrailer = async (packId: string, sizeBytes: number, readRange: (offset: number, length: number) => Promise<Buffer>): Promise<BlobEntry[] | undefined> => {
    const first = !trailersRead.has(packId);
    trailersRead.add(packId);
    const name = packPath(packId);
    try {
      const { blobs, trailerOffsetBytes } = await readPackTail(repository.keys, name, sizeBytes, readRange);
      const layout = packLayoutProblem(blobs, trailerOffsetBytes);
      if (layout !== undefined && first) problems.push({ kind: 'pack-damaged', pack: name, message: `pack ${name} is damaged (${layout})`, restorePoints: [] });
      return blobs;
    } catch (error) {
      if (!(error instanceof SnapshiftError)) throw error;
      if (first) problems.push({ kind: 'pack-damaged', pack: name, message: error.message, restorePoints: [] });
      return undefined;
    }
  };
  const mismatchedIds = await compareIndexWithTrailers(repository, packFiles, readTrailer, problems);
  const packNos = [...repository.packIds.keys()];
  const sampled = new Set(opts.readDataPercent === undefined ? [] : sample(packNos, opts.readDataPercent));
  let chunksVerified = 0;
  let bytesVerified = 0;
  // One bounded set of verifications across packs, so reading the next pack overlaps verifying this one.
  const inFlight = new Set<Promise<void>>();
  for (const packNo of packNos) {
    const packId = repository.packIds[packNo]!;
    const name = repository.packPathOf(packNo);
    const file = packFiles.get(packId);
    const liveChunks = live.byPack.get(packNo) ?? [];
    if (!file) {
      problems.push({ kind: 'pack-missing', pack: name, message: `pack ${name} is missing (the index names it)`, restorePoints: [] });
      for (const chunk of liveChunks) badIds.set(chunk.id.toString('hex'), { kind: 'chunk-missing', chunkId: chunk.id.toString('hex'), pack: name, message: `chunk ${chunk.id.toString('hex')} is missing: its pack ${name} is gone`, restorePoints: [] });
      continue;
    }
    packFiles.delete(packId);
    const whole = sampled.has(packNo) ? await repository.backend.get(name) : undefined;
    // Packs no readable index file lists (read from their trailers at load) were not compared above.
    if (!trailersRead.has(packId)) {
      await readTrailer(packId, file.sizeBytes, whole ? async (o, l) => whole.subarray(o, o + l) : (o, l) => repository.backend.getRange(name, o, l));
    }
    if (!whole) continue;
    const verifyOne = async (chunk: LiveChunk): Promise<void> => {
      const { offsetBytes, storedLength, compressed } = chunk.location;
      const idHex = chunk.id.toString('hex');
      const damage = (reason: string): void => void badIds.set(idHex, { kind: 'chunk-damaged', chunkId: idHex, pack: name, message: `chunk ${idHex} in pack ${name} is damaged: ${reason}`, restorePoints: [] });
      if (offsetBytes + storedLength > whole.length) return damage('it lies beyond the end of the pack');
      const opened = await repository.pool().open(chunk.id, Buffer.from(whole.subarray(offsetBytes, offsetBytes + storedLength)), compressed, true);
      chunksVerified++;
      bytesVerified += storedLength;
      if ('damaged' in opened) damage(opened.damaged);
    };
    for (const chunk of liveChunks) {
      const step = verifyOne(chunk).finally(() => inFlight.delete(step));
      inFlight.add(step);
      if (inFlight.size >= 4 * repository.workerCount) await Promise.race(inFlight);
    }
  }
  await Promise.all(inFlight);
  for (const [packId] of packFiles) warnings.push(`pack data/${packId.slice(0, 2)}/${packId} is in no index (left by an interrupted backup; gc removes it)`);
  // A live writer's temp file on this host is work in progress, not debris.
  const tempFiles = (await repository.backend.list('tmp')).filter((entry) => !tempFileOwnerIsLive(entry.name));
  if (tempFiles.length > 0) warnings.push(`${tempFiles.length} temporary file(s) in tmp/ (left by interrupted writes; the next backup on this host or gc removes them)`);

  const affected = await restorePointsNaming(repository, new Set([...badIds.keys(), ...mismatchedIds.keys()]));
  for (const [idHex, problem] of badIds) {
    problem.restorePoints = [...(affected.get(idHex) ?? [])];
    problems.push(problem);
  }
  for (const [idHex, mismatches] of mismatchedIds) for (const problem of mismatches) problem.restorePoints = [...(affected.get(idHex) ?? [])];
  for (const problem of problems) {
    if (problem.restorePoints.length > 0 && !problem.message.includes('restore point')) problem.message += `; affects restore point(s) ${problem.restorePoints.join(', ')}`;
  }
  return { problems, warnings, restorePoints: live.restorePoints + live.damagedManifests.length, packs: packNos.length, chunksVerified, bytesVerified, durationMs: performance.now() - started };
}

/**
 * The index files against the pack trailers (docs/FORMAT.md § Packs, § Index files): every entry an index
 * file lists for a pack must be in that pack's trailer, at the same offset, with the same stored length and
 * compression, and the same raw length unless the index left it out (0). A trailer may list more blobs than
 * the index: gc's index leaves out the unreferenced blobs of the packs it keeps. One index file at a time, so
 * memory stays that of one file; a pack missing from data/ is reported by the caller. Returns the problems
 * by chunk id (their restore points are filled in later).
 */
async function compareIndexWithTrailers(
  repository: Repository,
  packFiles: ReadonlyMap<string, BackendEntry>,
  readTrailer: (packId: string, sizeBytes: number, readRange: (offset: number, length: number) => Promise<Buffer>) => Promise<BlobEntry[] | undefined>,
  problems: CheckProblem[],
): Promise<Map<string, CheckProblem[]>> {
  const mismatched = new Map<string, CheckProblem[]>();
  const damagedNames = new Set(repository.damagedIndexFiles.map((damaged) => damaged.name));
  for (const indexName of repository.indexFiles.filter((name) => !damagedNames.has(name))) {
    let content: IndexFileContent;
    try {
      content = decodeIndexFile(repository.keys, await repository.backend.get(indexName), indexName);
    } catch (error) {
      if (!(error instanceof SnapshiftError)) throw error;
      problems.push({ kind: 'index-damaged', message: error.message, restorePoints: [] });
      continue;
    }
    const comparePack = async ({ packId, blobs }: IndexFileContent['packs'][number]): Promise<void> => {
      const file = packFiles.get(packId);
      if (!file || blobs.length === 0) return;
      const trailer = await readTrailer(packId, file.sizeBytes, (offset, length) => repository.backend.getRange(file.name, offset, length));
      if (!trailer) return;
      const inTrailer = new Map(trailer.map((blob) => [blob.id.toString('hex'), blob]));
      for (const indexed of blobs) {
        const idHex = indexed.id.toString('hex');
        const difference = entryDifference(indexed, inTrailer.get(idHex));
        if (difference === undefined) continue;
        const problem: CheckProblem = { kind: 'index-mismatch', chunkId: idHex, pack: file.name, message: `index file ${indexName} and the trailer of pack ${file.name} disagree on chunk ${idHex}: ${difference} (check --read-data verifies the blob the index points at; "snapshift repo repair-index" rebuilds the index from the trailers)`, restorePoints: [] };
        problems.push(problem);
        mismatched.set(idHex, [...(mismatched.get(idHex) ?? []), problem]);
      }
    };
    const inFlight = new Set<Promise<void>>();
    for (const pack of content.packs) {
      const step = comparePack(pack).finally(() => inFlight.delete(step));
      inFlight.add(step);
      if (inFlight.size >= trailerReadsInFlight) await Promise.race(inFlight);
    }
    await Promise.all(inFlight);
  }
  return mismatched;
}

/** How an index entry differs from the pack trailer's entry for the same id, or undefined when they agree. */
function entryDifference(indexed: BlobEntry, inTrailer: BlobEntry | undefined): string | undefined {
  if (!inTrailer) return 'the index lists it, the trailer does not';
  const differences: string[] = [];
  if (indexed.offsetBytes !== inTrailer.offsetBytes) differences.push(`offset ${indexed.offsetBytes} in the index, ${inTrailer.offsetBytes} in the trailer`);
  if (indexed.storedLength !== inTrailer.storedLength) differences.push(`stored length ${indexed.storedLength} in the index, ${inTrailer.storedLength} in the trailer`);
  if (indexed.compressed !== inTrailer.compressed) differences.push(`${indexed.compressed ? 'compressed' : 'not compressed'} in the index, ${inTrailer.compressed ? 'compressed' : 'not compressed'} in the trailer`);
  if (indexed.rawLength !== 0 && indexed.rawLength !== inTrailer.rawLength) differences.push(`raw length ${indexed.rawLength} in the index, ${inTrailer.rawLength} in the trailer`);
  return differences.length === 0 ? undefined : differences.join('; ');
}

function sample<T>(items: readonly T[], percent: number): T[] {
  if (percent >= 100) return [...items];
  const count = Math.max(items.length > 0 ? 1 : 0, Math.round((items.length * percent) / 100));
  const shuffled = [...items];
  for (let i = shuffled.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [shuffled[i], shuffled[j]] = [shuffled[j]!, shuffled[i]!];
  }
  return shuffled.slice(0, count);
}
