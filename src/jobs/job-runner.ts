import { randomUUID } from 'node:crypto';
import { join, resolve } from 'node:path';
import { SessionState, type Catalog, type VmTarget } from '../catalog/index.ts';
import { messageOf } from '../core/errors.ts';
import { faultPoint } from '../core/fault-points.ts';
import { snapshiftProcessIsAlive } from '../core/process-alive.ts';
import { runBackup } from '../processing/backup-run.ts';
import type { TaskProgress } from '../processing/regular-mode.ts';
import type { TaskStats } from '../processing/task-stats.ts';
import { forgetRestorePoints, openRepository, type Repository } from '../repository/index.ts';
import { verifyBoot } from '../restore/vm/boot-verification.ts';
import { qemuConfigurationOf } from '../restore/vm/configuration-of.ts';
import type { JobDefinition } from './job-definition.ts';
import { summarizeSession, type SessionSummary } from './session-summary.ts';

export interface JobRunContext {
  catalog: Catalog;
  home: string;
  /**
   * The repository password (undefined for an unencrypted repository), or how to get it: a function that
   * throws (no password anywhere) fails the session with that reason instead of leaving no trace.
   */
  password?: string | (() => Promise<string | undefined>);
  /** Aborting stops the run cleanly: snapshots undone, partial restore points dropped, session Stopped. */
  signal?: AbortSignal;
  onProgress?: (progress: TaskProgress) => void;
  /** Events a CLI or daemon shows as they happen. */
  onTaskEnd?: (task: { vmName: string; state: SessionState; reason?: string }) => void;
  maxReadBytesPerSecond?: number;
  maxWriteBytesPerSecond?: number;
  /** Read every disk in full, even where changed-block tracking could limit the read (`job run --full`). */
  full?: boolean;
}

export interface JobRunResult {
  sessionId: string;
  state: SessionState;
  summary: SessionSummary;
  /** `warnings`: non-fatal problems of the task (also in `reason`, and in the recorded stats as `warnings`). */
  tasks: JobTask[];
}

interface JobTask {
  vmName: string;
  state: SessionState;
  reason?: string;
  restorePointId?: string;
  stats?: TaskStats;
  warnings?: string[];
  /** The job's boot verification of this task's restore point (job option verifyBoot). */
  bootVerification?: { passed: boolean; bootMs: number | null; detail: string };
}

/**
 * Runs a job as one session: a task per VM (in parallel up to the job's limit, grouped for storage
 * snapshots), then retention if the run produced restore points. A task's failure never stops the others.
 * The session ends Success (all good), Warning (some failed, or fell back to regular mode), Failed (none
 * succeeded) or Stopped (aborted).
 */
export async function runJob(job: JobDefinition, context: JobRunContext): Promise<JobRunResult> {
  const { catalog } = context;
  const sessionId = randomUUID();
  const started = performance.now();
  markCrashedSessions(catalog);
  catalog.jobs.startSession(sessionId, job.name);
  faultPoint('job.after-session-start');
  const tasks: JobRunResult['tasks'] = [];
  let storageSnapshots = 0;
  let repository: Repository | undefined;
  let startError: string | undefined;
  let password: string | undefined;
  try {
    password = typeof context.password === 'function' ? await context.password() : context.password;
    repository = await openRepository(job.repository, { password, maxWriteBytesPerSecond: context.maxWriteBytesPerSecond });
    const vms: VmTarget[] = [];
    for (const vmName of job.vms) {
      const vm = catalog.getVm(vmName);
      if (vm) vms.push(vm);
      else tasks.push({ vmName, state: SessionState.failed, reason: `no VM named "${vmName}" (add it with "snapshift host add")` });
    }
    if (vms.length > 0) {
      const run = await runBackup({
        vms,
        mode: job.mode,
        repository,
        catalog,
        runDir: join(context.home, 'run'),
        failoverToRegular: job.failoverToRegular,
        vmsPerStorageSnapshot: job.vmsPerStorageSnapshot,
        parallel: job.parallel,
        quiesce: job.quiesce,
        full: context.full ?? false,
        sessionId,
        signal: context.signal,
        onProgress: context.onProgress,
        maxReadBytesPerSecond: context.maxReadBytesPerSecond ?? (job.maxReadRateMBps ? job.maxReadRateMBps * 1e6 : undefined),
      });
      storageSnapshots = run.storageSnapshotCount;
      for (const outcome of run.outcomes) {
        if (outcome.error) {
          const stopped = context.signal?.aborted === true;
          const warnings = outcome.warnings ?? [];
          tasks.push({
            vmName: outcome.vmName,
            state: stopped ? SessionState.stopped : SessionState.failed,
            reason: [stopped ? 'stopped by request' : messageOf(outcome.error), ...warnings].join('; '),
            ...(warnings.length > 0 ? { warnings } : {}),
          });
        } else {
          const result = outcome.result!;
          const warnings = result.warnings ?? [];
          const notes = [...(result.failoverReason ? [`failover to regular mode: ${result.failoverReason}`] : []), ...warnings];
          tasks.push({
            vmName: outcome.vmName,
            state: notes.length > 0 ? SessionState.warning : SessionState.success,
            reason: notes.length > 0 ? notes.join('; ') : undefined,
            restorePointId: result.restorePoint.id,
            stats: result.stats,
            ...(warnings.length > 0 ? { warnings } : {}),
          });
        }
      }
    }
    if (job.verifyBoot && !context.signal?.aborted) await verifyRestorePointsBoot(job, tasks, repository, context.home, password);
  } catch (error) {
    // The run itself could not start (no password, repository missing): every VM not yet reported fails with
    // it, and the session's record says why.
    startError = messageOf(error);
    for (const vmName of job.vms) if (!tasks.some((task) => task.vmName === vmName)) tasks.push({ vmName, state: SessionState.failed, reason: startError });
  }

  for (const task of tasks) {
    // A failed task has no statistics: its warnings are in its reason alone.
    const stats = task.stats ? { ...task.stats, ...(task.warnings ? { warnings: task.warnings } : {}), ...(task.bootVerification ? { bootVerification: task.bootVerification } : {}) } : null;
    catalog.jobs.recordTask({ sessionId, vmName: task.vmName, state: task.state, restorePointId: task.restorePointId ?? null, reason: task.reason ?? null, stats });
    context.onTaskEnd?.(task);
  }
  const state = sessionState(tasks, context.signal?.aborted === true);
  const counts = {
    total: tasks.length,
    success: tasks.filter((task) => task.state === SessionState.success).length,
    warning: tasks.filter((task) => task.state === SessionState.warning).length,
    failed: tasks.filter((task) => task.state === SessionState.failed).length,
    stopped: tasks.filter((task) => task.state === SessionState.stopped).length,
  };
  const summary = summarizeSession(
    tasks.flatMap((task) => (task.stats ? [task.stats] : [])),
    counts,
    performance.now() - started,
    storageSnapshots,
  );
  if (startError !== undefined) summary.error = startError;
  try {
    if (repository && (state === SessionState.success || state === SessionState.warning) && Object.keys(job.retention).length > 0) {
      faultPoint('job.before-retention');
      summary.retention = { forgotten: await applyJobRetention(job, repository, catalog) };
    }
  } finally {
    await repository?.close();
    catalog.jobs.endSession(sessionId, state, { ...summary });
  }
  return { sessionId, state, summary, tasks };
}

/**
 * Boots each restore point the run made (one at a time: each is a whole VM) and records the verdict in the
 * task; a point that does not boot turns its task into a Warning, with the reason.
 */
async function verifyRestorePointsBoot(job: JobDefinition, tasks: JobTask[], repository: Repository, home: string, password: string | undefined): Promise<void> {
  const policy = job.verifyBoot!;
  for (const task of tasks) {
    if (!task.restorePointId) continue;
    let verdict: JobTask['bootVerification'];
    try {
      const point = (await repository.openRestorePoint(task.restorePointId)).summary;
      const result = await verifyBoot({
        home,
        point,
        configuration: qemuConfigurationOf(point),
        repository: resolve(job.repository),
        ...(password !== undefined ? { password } : {}),
        marker: policy.marker,
        timeoutMs: policy.timeoutSeconds * 1000,
      });
      verdict = { passed: result.passed, bootMs: result.bootMs, detail: result.detail };
    } catch (error) {
      verdict = { passed: false, bootMs: null, detail: `could not be booted: ${messageOf(error)}` };
    }
    task.bootVerification = verdict;
    if (!verdict.passed) {
      task.state = SessionState.warning;
      task.reason = [task.reason, `boot verification failed: ${verdict.detail}`].filter(Boolean).join('; ');
    }
  }
}

function sessionState(tasks: JobRunResult['tasks'], stopped: boolean): SessionState {
  if (stopped) return SessionState.stopped;
  const succeeded = tasks.filter((task) => task.state === SessionState.success || task.state === SessionState.warning).length;
  if (succeeded === 0) return SessionState.failed;
  return succeeded === tasks.length && tasks.every((task) => task.state === SessionState.success) ? SessionState.success : SessionState.warning;
}

/** Retention per VM of the job; forgotten restore points leave the catalog too. Space comes back with `gc`. */
async function applyJobRetention(job: JobDefinition, repository: Repository, catalog: Catalog): Promise<string[]> {
  const forgotten: string[] = [];
  for (const vmName of job.vms) {
    const decisions = await forgetRestorePoints(repository, job.retention, { vmName });
    forgotten.push(...decisions.filter((decision) => !decision.keep).map((decision) => decision.point.id));
  }
  catalog.removeRestorePoints(forgotten);
  return forgotten;
}

/** Sessions left Running by a process that is gone (killed, machine rebooted) end as Failed. */
export function markCrashedSessions(catalog: Catalog): void {
  for (const session of catalog.jobs.runningSessions()) {
    if (!snapshiftProcessIsAlive(session.ownerPid)) catalog.jobs.endSession(session.id, SessionState.failed, { ...session.summary, error: 'the process running this session ended unexpectedly' });
  }
}
