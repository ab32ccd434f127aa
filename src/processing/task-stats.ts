import type { WriterStats } from '../repository/index.ts';
import type { DiskCbtStats } from '../datamover/changed-blocks.ts';
import type { DiskCopyStats } from '../datamover/disk-copier.ts';

export type Stage = 'source' | 'proxy' | 'target';
/** The stage that held the copy back most, or 'none' when every stage was idle (e.g. an unchanged incremental). */
export type Bottleneck = Stage | 'none';

/** What one VM task reports (DESIGN.md: "Each task records …"). */
export interface TaskStats {
  mode: string;
  durationMs: number;
  processedBytes: number;
  readBytes: number;
  transferredBytes: number;
  dedupRatio: number;
  compressionRatio: number;
  rateMBps: number;
  vmSnapshotLifetimeMs: number;
  deltaBytesAtCommit: number;
  commitMs: number;
  storageSnapshotLifetimeMs: number | null;
  /** Fleecing mode: how long the copy-before-write filter lived, and the old blocks it copied aside (else null). */
  fleecingLifetimeMs: number | null;
  scratchBytes: number | null;
  /** Whether the guest was quiesced, and if not why (null: not asked for). */
  quiesce: string | null;
  /**
   * Share of the copy time each stage spent on this task's work alone (tasks of a job run side by side on one
   * worker pool and repository): source = its NBD reads in flight, proxy = the workers' time on its chunks
   * over the pool's capacity, target = its backend writes in flight (appends and seals overlap: their union).
   */
  busyPercent: Record<Stage, number>;
  bottleneck: Bottleneck;
  /** Per disk; `writerWaitMs` is the copy's time waiting for the repository to take chunks (its backpressure). */
  disks: Array<{ name: string; sizeBytes: number; readBytes: number; zeroBytes: number; durationMs: number; writerWaitMs: number } & DiskCbtStats>;
}

/** Folds the data mover's and the repository writer's counters into the task's statistics. */
export function summarizeTask(input: {
  mode: string;
  durationMs: number;
  copies: Array<{ name: string; stats: DiskCopyStats; cbt?: DiskCbtStats }>;
  writer: WriterStats;
  /** Blob workers in the pool: their busy times add up, so capacity is this many times the wall time. */
  workerCount?: number;
  vmSnapshot: { lifetimeMs: number; deltaBytesAtCommit: number; commitMs: number };
  fleece?: { lifetimeMs: number; scratchBytes: number };
  storageSnapshotLifetimeMs?: number;
  quiesceNote?: string | null;
}): TaskStats {
  const processedBytes = sum(input.copies.map((copy) => copy.stats.sizeBytes));
  const readBytes = sum(input.copies.map((copy) => copy.stats.bytesRead));
  const copyMs = Math.max(1, sum(input.copies.map((copy) => copy.stats.durationMs)));
  const newBytes = input.writer.bytesIn - input.writer.dedupBytes;
  const busyPercent: Record<Stage, number> = {
    source: percent(sum(input.copies.map((copy) => copy.stats.sourceBusyMs)), copyMs),
    // Workers run in parallel: their summed busy time is measured against the pool's capacity.
    proxy: percent(input.writer.workerBusyMs / Math.max(1, input.workerCount ?? 1), copyMs),
    target: percent(input.writer.writeBusyMs, copyMs),
  };
  const bottleneck = pickBottleneck(busyPercent);
  return {
    mode: input.mode,
    durationMs: input.durationMs,
    processedBytes,
    readBytes,
    transferredBytes: input.writer.storedBytes,
    dedupRatio: newBytes > 0 ? input.writer.bytesIn / newBytes : input.writer.bytesIn > 0 ? Infinity : 1,
    compressionRatio: input.writer.compressedOutBytes > 0 ? input.writer.compressedInBytes / input.writer.compressedOutBytes : 1,
    rateMBps: processedBytes / 1e6 / (input.durationMs / 1000),
    vmSnapshotLifetimeMs: input.vmSnapshot.lifetimeMs,
    deltaBytesAtCommit: input.vmSnapshot.deltaBytesAtCommit,
    commitMs: input.vmSnapshot.commitMs,
    storageSnapshotLifetimeMs: input.storageSnapshotLifetimeMs ?? null,
    fleecingLifetimeMs: input.fleece?.lifetimeMs ?? null,
    scratchBytes: input.fleece?.scratchBytes ?? null,
    quiesce: input.quiesceNote ?? null,
    busyPercent,
    bottleneck,
    disks: input.copies.map((copy) => ({
      name: copy.name,
      sizeBytes: copy.stats.sizeBytes,
      readBytes: copy.stats.bytesRead,
      zeroBytes: copy.stats.zeroBytes,
      durationMs: copy.stats.durationMs,
      cbtSource: copy.cbt?.cbtSource ?? 'none',
      dirtyBytes: copy.cbt?.dirtyBytes ?? null,
      fallbackReason: copy.cbt?.fallbackReason ?? null,
      writerWaitMs: copy.stats.writerWaitMs,
    })),
  };
}

/** A stage busy less than this share of the copy held nothing back. */
const idleBelowPercent = 1;

/** The busiest stage, or 'none' when all were idle: naming "source" for a copy that read nothing would mislead. */
export function pickBottleneck(busyPercent: Record<Stage, number>): Bottleneck {
  const [stage, percentBusy] = (Object.entries(busyPercent) as Array<[Stage, number]>).sort((a, b) => b[1] - a[1])[0]!;
  return percentBusy < idleBelowPercent ? 'none' : stage;
}

function sum(values: number[]): number {
  return values.reduce((total, value) => total + value, 0);
}

function percent(busyMs: number, totalMs: number): number {
  return Math.min(100, Math.round((busyMs / totalMs) * 1000) / 10);
}
