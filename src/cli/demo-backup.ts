import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { Catalog, VmTarget } from '../catalog/index.ts';
import { SnapshiftError } from '../core/errors.ts';
import { exec } from '../core/exec.ts';
import { QmpClient } from '../hypervisor/qemu/qmp-client.ts';
import type { LabVm } from '../lab/index.ts';
import { runBackup, type ProcessingMode } from '../processing/backup-run.ts';
import type { TaskStats } from '../processing/task-stats.ts';
import type { Repository } from '../repository/index.ts';
import { restoreDisk } from '../restore/disk-restore.ts';
import { ProgressBar } from './progress.ts';

/** One demo backup of the writing guest, with what it takes to prove its restore equals the point in time. */
export interface DemoBackup {
  mode: ProcessingMode;
  restorePointId: string;
  stats: TaskStats;
  /** Wall time of runBackup as the admin waits for it (hunt, snapshots, copy, commit, restore point). */
  totalMs: number;
  /** Reflink copy of the disk at the point in time (on btrfs: instant, shares extents). */
  referencePath: string;
  /** How long making that copy took: inside the VM snapshot's lifetime, or (fleecing) with the guest paused. */
  referenceCopyMs: number;
  heartbeatsBefore: number;
  heartbeatsAfter: number;
  writtenMiBBefore: number;
  writtenMiBAfter: number;
  verification?: RestoreVerification;
}

export interface RestoreVerification {
  referenceMd5: string;
  restoredMd5: string;
  equal: boolean;
  restoreMs: number;
}

export interface DemoBackupInput {
  /** The lab VM as the catalog knows it (host and name). */
  target: VmTarget;
  vm: LabVm;
  mode: ProcessingMode;
  repository: Repository;
  catalog: Catalog;
  runDir: string;
  /** A folder on the same btrfs filesystem as the VM disk (reflinks do not cross filesystems). */
  referenceDir: string;
  showProgress: boolean;
}

/**
 * Backs up the lab VM in `mode` while it writes. At the VM-snapshot instant (the `afterVmSnapshots` hook, in
 * regular and storage-snapshot mode the base is frozen then) the base qcow2 is reflink-copied: that copy is the
 * point in time the restore must equal. Fleecing freezes no file: the guest is paused (QEMU flushes the image on
 * `stop`) just before the fleecing starts, copied, and resumed once it holds the point in time. Heartbeats
 * before and after show the guest kept writing throughout.
 */
export async function demoBackup(input: DemoBackupInput): Promise<DemoBackup> {
  await mkdir(input.referenceDir, { recursive: true });
  const referencePath = join(input.referenceDir, `${input.vm.name}-${input.mode}.qcow2`);
  await rm(referencePath, { force: true });
  const before = await input.vm.heartbeats();
  let referenceCopyMs: number | undefined;
  const bar = new ProgressBar(input.showProgress, `    ${input.mode}`);
  const started = performance.now();
  let run;
  try {
    run = await runBackup({
      vms: [input.target],
      mode: input.mode,
      repository: input.repository,
      catalog: input.catalog,
      runDir: input.runDir,
      failoverToRegular: false,
      // Both modes read the whole disk, so their times compare (an incremental would read far less).
      full: true,
      onProgress: (progress) => bar.update(progress.processedBytes, progress.totalBytes, progress.phase),
      hooks: {
        beforeVmSnapshots: async () => {
          if (input.mode !== 'fleecing') return;
          // The lab's own monitor: the engine holds the VM's QMP socket during the task.
          await using qmp = await QmpClient.connect(input.vm.labQmpSocketPath);
          await qmp.execute('stop');
          referenceCopyMs = await reflinkCopy(input.vm.diskPath, referencePath);
        },
        afterVmSnapshots: async () => {
          if (input.mode !== 'fleecing') {
            referenceCopyMs = await reflinkCopy(input.vm.diskPath, referencePath);
            return;
          }
          await using qmp = await QmpClient.connect(input.vm.labQmpSocketPath);
          await qmp.execute('cont');
        },
      },
    });
  } finally {
    bar.stop();
  }
  const totalMs = performance.now() - started;
  const outcome = run.outcomes[0];
  if (!outcome?.result) throw new SnapshiftError('DEMO_BACKUP_FAILED', `${input.mode} backup of ${input.target.name} failed: ${outcome?.error?.message ?? 'no outcome'}`, { cause: outcome?.error });
  if (outcome.result.stats.mode !== input.mode) throw new SnapshiftError('DEMO_BACKUP_FAILED', `asked for a ${input.mode} backup, got ${outcome.result.stats.mode}`);
  if (referenceCopyMs === undefined) throw new SnapshiftError('DEMO_BACKUP_FAILED', 'the backup never reached its VM snapshot (no reference copy was made)');
  if (!(await input.vm.isRunning())) throw new SnapshiftError('LAB_VM_FAILED', `the demo guest stopped during the ${input.mode} backup`);
  // One more heartbeat after the backup, so "after" is a fresh sign of life, not a line printed before it.
  const after = await input.vm.waitForHeartbeats(Math.max((await input.vm.heartbeats()).length, before.length) + 1, 5_000);
  return {
    mode: input.mode,
    restorePointId: outcome.result.restorePoint.id,
    stats: outcome.result.stats,
    totalMs,
    referencePath,
    referenceCopyMs,
    heartbeatsBefore: before.length,
    heartbeatsAfter: after.length,
    writtenMiBBefore: before.at(-1)?.writtenMiB ?? 0,
    writtenMiBAfter: after.at(-1)?.writtenMiB ?? 0,
  };
}

async function reflinkCopy(from: string, to: string): Promise<number> {
  const started = performance.now();
  await exec('cp', ['--reflink=always', from, to]);
  return performance.now() - started;
}

/** Restores the backup's (only) disk to raw and compares its md5 with the reference copy's guest-visible bytes. */
export async function verifyRestore(backup: DemoBackup, repository: Repository, scratchDir: string): Promise<RestoreVerification> {
  await mkdir(scratchDir, { recursive: true });
  const restoredPath = join(scratchDir, `restored-${backup.mode}.raw`);
  const referenceRawPath = join(scratchDir, `reference-${backup.mode}.raw`);
  try {
    // The reference's md5 (qemu-img convert to raw, then md5sum) runs beside the restore: two cores, half the wait.
    const referenceMd5 = (async () => {
      await exec('qemu-img', ['convert', '-U', '-q', '-f', 'qcow2', '-O', 'raw', backup.referencePath, referenceRawPath], { timeoutMs: 600_000 });
      return md5File(referenceRawPath);
    })();
    referenceMd5.catch(() => undefined); // awaited below, after the restore
    const started = performance.now();
    const reader = await repository.openRestorePoint(backup.restorePointId);
    const [disk, ...others] = reader.summary.disks;
    if (!disk || others.length > 0) throw new SnapshiftError('DEMO_BACKUP_FAILED', `the demo VM has one disk; restore point ${backup.restorePointId} has ${reader.summary.disks.length}`);
    await restoreDisk(reader, disk.name, restoredPath, { format: 'raw', force: true, chunkSizeBytes: repository.chunkSizeBytes });
    const restoreMs = performance.now() - started;
    const restoredMd5 = await md5File(restoredPath);
    return { referenceMd5: await referenceMd5, restoredMd5, equal: (await referenceMd5) === restoredMd5, restoreMs };
  } finally {
    await rm(restoredPath, { force: true });
    await rm(referenceRawPath, { force: true });
  }
}

/** md5sum in a child process: hashing a whole disk stays off this process's event loop (and its core). */
async function md5File(path: string): Promise<string> {
  const { stdout } = await exec('md5sum', [path], { timeoutMs: 600_000 });
  return stdout.slice(0, 32);
}
