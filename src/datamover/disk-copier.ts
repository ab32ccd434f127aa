import { abortable } from '../core/abortable.ts';
import type { DiskWriter } from '../repository/index.ts';
import { TokenBucket } from '../core/token-bucket.ts';
import { BusyClock } from '../core/busy-clock.ts';
import type { DiskSource } from './disk-source.ts';
import { alignRegions, type Region } from './extent-map.ts';

export interface DiskCopyOptions {
  chunkSizeBytes: number;
  /** Chunk reads in flight; bounds memory to about readAhead × chunk size. */
  readAhead?: number;
  /** Called as the copy advances, with bytes of the disk dealt with so far (read or known zero). */
  onProgress?: (processedBytes: number) => void;
  signal?: AbortSignal;
  /** Caps the read rate (bytes/s), to stand for a slow production link in benchmarks. */
  maxReadBytesPerSecond?: number;
  /**
   * Read only these regions (changed-block tracking), rounded out to chunks; chunks outside them are not
   * written at all, so the writer keeps what its base restore point has there. Default: the source's data
   * regions, with everything else written as zeros.
   */
  changedRegions?: readonly Region[];
}

export interface DiskCopyStats {
  sizeBytes: number;
  bytesRead: number;
  /** Bytes skipped as holes or found all-zero after reading. */
  zeroBytes: number;
  sourceBusyMs: number;
  /** Time spent waiting for the repository writer to accept chunks (its backpressure). */
  writerWaitMs: number;
  durationMs: number;
}

/**
 * Copies one disk into the repository: only regions the source reports as data are read, cut into aligned
 * chunks; all-zero chunks are recorded as zeros without being stored. Reads are pipelined (bounded window)
 * and handed to the writer in disk order.
 */
export async function copyDisk(source: DiskSource, writer: DiskWriter, options: DiskCopyOptions): Promise<DiskCopyStats> {
  const started = performance.now();
  const chunkBytes = options.chunkSizeBytes;
  const readAhead = Math.max(1, options.readAhead ?? 8);
  const sourceClock = new BusyClock();
  const stats: DiskCopyStats = { sizeBytes: source.sizeBytes, bytesRead: 0, zeroBytes: 0, sourceBusyMs: 0, writerWaitMs: 0, durationMs: 0 };
  const incremental = options.changedRegions !== undefined;
  const regions = alignRegions(options.changedRegions ?? (await sourceClock.time(() => source.dataRegions())), chunkBytes, source.sizeBytes);
  const throttle = options.maxReadBytesPerSecond ? new TokenBucket(options.maxReadBytesPerSecond) : undefined;
  let processed = 0;

  const putZero = async (offset: number, length: number) => {
    if (length <= 0) return;
    await writer.putZero(offset, length);
    stats.zeroBytes += length;
    processed += length;
    options.onProgress?.(processed);
  };

  // Every chunk to read, in disk order; the gaps between regions are zero.
  const reads: Array<{ offset: number; length: number }> = [];
  let cursor = 0;
  const zeroRuns: Array<{ before: number; offset: number; length: number }> = [];
  for (const region of regions) {
    if (region.offset > cursor && !incremental) zeroRuns.push({ before: reads.length, offset: cursor, length: region.offset - cursor });
    for (let offset = region.offset; offset < region.offset + region.length; offset += chunkBytes) {
      reads.push({ offset, length: Math.min(chunkBytes, region.offset + region.length - offset) });
    }
    cursor = region.offset + region.length;
  }
  if (cursor < source.sizeBytes && !incremental) zeroRuns.push({ before: reads.length, offset: cursor, length: source.sizeBytes - cursor });

  const startRead = async (index: number): Promise<Buffer> => {
    const chunk = reads[index]!;
    // A throttled source is a slow source: its wait counts as the source's busy time.
    return sourceClock.time(async () => {
      if (throttle) await throttle.take(chunk.length);
      return source.read(chunk.offset, chunk.length);
    });
  };

  const window: Array<Promise<Buffer>> = [];
  let nextToStart = 0;
  let zeroRunIndex = 0;
  for (let index = 0; index < reads.length; index++) {
    options.signal?.throwIfAborted();
    while (nextToStart < reads.length && nextToStart < index + readAhead) {
      const pending = startRead(nextToStart++);
      pending.catch(() => undefined); // awaited in order below; avoid an unhandled rejection meanwhile
      window.push(pending);
    }
    while (zeroRunIndex < zeroRuns.length && zeroRuns[zeroRunIndex]!.before <= index) {
      const run = zeroRuns[zeroRunIndex++]!;
      await putZero(run.offset, run.length);
    }
    // A hung source (or a long throttle wait) must not hold a stop back: the read is abandoned, its connection closed by its owner.
    const data = await abortable(window.shift()!, options.signal);
    const chunk = reads[index]!;
    stats.bytesRead += data.length;
    const waitStarted = performance.now();
    if (isAllZero(data)) {
      await writer.putZero(chunk.offset, chunk.length);
      stats.zeroBytes += chunk.length;
    } else {
      await writer.putChunk(chunk.offset, data);
    }
    stats.writerWaitMs += performance.now() - waitStarted;
    processed += chunk.length;
    options.onProgress?.(processed);
  }
  while (zeroRunIndex < zeroRuns.length) {
    const run = zeroRuns[zeroRunIndex++]!;
    await putZero(run.offset, run.length);
  }
  stats.sourceBusyMs = sourceClock.busyMs;
  stats.durationMs = performance.now() - started;
  return stats;
}

const zeroBlock = Buffer.alloc(64 * 1024);

/** memcmp against a zero block, 64 KiB at a time: far faster than a byte loop in JS. */
export function isAllZero(data: Buffer): boolean {
  for (let offset = 0; offset < data.length; offset += zeroBlock.length) {
    const end = Math.min(data.length, offset + zeroBlock.length);
    if (data.compare(zeroBlock, 0, end - offset, offset, end) !== 0) return false;
  }
  return true;
}
