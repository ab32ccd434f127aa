import { tempFileOwnerIsLive } from './temp-files.ts';
import { performance } from 'node:perf_hooks';
import { SnapshiftError } from '../core/errors.ts';
import type { Repository } from './repository.ts';
import { readPackTrailer } from './pack-format.ts';
import { markLiveChunks, restorePointsNaming, type LiveChunk } from './live-chunks.ts';

export interface CheckProblem {
  kind: 'index-damaged' | 'manifest-damaged' | 'pack-missing' | 'pack-damaged' | 'chunk-missing' | 'chunk-damaged';
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

/**
 * Checks a repository's structure (config, key, index files, manifests, pack trailers, every referenced
 * chunk indexed); with `readDataPercent`, also decrypts and re-hashes the referenced chunks of that share
 * of packs. Never changes the repository (a read-only one is checked without a lock; `onWarning` says so).
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

  const packFiles = new Map((await repository.backend.list('data')).map((e) => [e.name.split('/').at(-1)!, e]));
  const badIds = new Map<string, CheckProblem>();
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
    const readRange = whole ? async (o: number, l: number) => whole.subarray(o, o + l) : (o: number, l: number) => repository.backend.getRange(name, o, l);
    try {
      await readPackTrailer(repository.keys, name, file.sizeBytes, readRange);
    } catch (error) {
      if (!(error instanceof SnapshiftError)) throw error;
      problems.push({ kind: 'pack-damaged', pack: name, message: error.message, restorePoints: [] });
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

  const affected = await restorePointsNaming(repository, new Set(badIds.keys()));
  for (const [idHex, problem] of badIds) {
    problem.restorePoints = [...(affected.get(idHex) ?? [])];
    problems.push(problem);
  }
  for (const problem of problems) {
    if (problem.restorePoints.length > 0 && !problem.message.includes('restore point')) problem.message += `; affects restore point(s) ${problem.restorePoints.join(', ')}`;
  }
  return { problems, warnings, restorePoints: live.restorePoints + live.damagedManifests.length, packs: packNos.length, chunksVerified, bytesVerified, durationMs: performance.now() - started };
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
