import { pickBottleneck, type Bottleneck, type Stage, type TaskStats } from '../processing/task-stats.ts';

/** A session's figures: the sums of its tasks, ratios of the sums, and the stage that held it back most. */
export interface SessionSummary {
  tasks: { total: number; success: number; warning: number; failed: number; stopped: number };
  processedBytes: number;
  readBytes: number;
  transferredBytes: number;
  dedupRatio: number | null;
  compressionRatio: number | null;
  durationMs: number;
  rateMBps: number;
  busyPercent: Record<Stage, number> | null;
  bottleneck: Bottleneck | null;
  storageSnapshots: number;
  retention?: { forgotten: string[] };
  /** Why the session could not start (no password, repository missing); its tasks failed with it. */
  error?: string;
}

export function summarizeSession(stats: readonly TaskStats[], counts: SessionSummary['tasks'], durationMs: number, storageSnapshots: number): SessionSummary {
  const sum = (pick: (task: TaskStats) => number) => stats.reduce((total, task) => total + pick(task), 0);
  const processedBytes = sum((task) => task.processedBytes);
  const taskMs = sum((task) => task.durationMs);
  // Busy shares weighted by how long each task ran, so a long task counts for more than a short one.
  const busyPercent =
    stats.length === 0 || taskMs === 0
      ? null
      : (Object.fromEntries(
          (['source', 'proxy', 'target'] as const).map((stage) => [stage, Math.round((sum((task) => task.busyPercent[stage] * task.durationMs) / taskMs) * 10) / 10]),
        ) as Record<Stage, number>);
  const bottleneck = busyPercent ? pickBottleneck(busyPercent) : null;
  const weightedRatio = (pick: (task: TaskStats) => number) => {
    const finite = stats.filter((task) => Number.isFinite(pick(task)) && task.readBytes > 0);
    const weight = finite.reduce((total, task) => total + task.readBytes, 0);
    return weight === 0 ? null : finite.reduce((total, task) => total + pick(task) * task.readBytes, 0) / weight;
  };
  return {
    tasks: counts,
    processedBytes,
    readBytes: sum((task) => task.readBytes),
    transferredBytes: sum((task) => task.transferredBytes),
    dedupRatio: weightedRatio((task) => task.dedupRatio),
    compressionRatio: weightedRatio((task) => task.compressionRatio),
    durationMs,
    rateMBps: durationMs > 0 ? processedBytes / 1e6 / (durationMs / 1000) : 0,
    busyPercent,
    bottleneck,
    storageSnapshots,
  };
}
