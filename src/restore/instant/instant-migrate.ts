import { promises as fs } from 'node:fs';
import { join } from 'node:path';
import { SnapshiftError } from '../../core/errors.ts';
import { exec } from '../../core/exec.ts';
import { endOwnedProcess, isOwnedProcessAlive } from '../../core/owned-process.ts';
import { connectQmp } from '../../hypervisor/qemu/qmp-connect.ts';
import type { QmpEvent, QmpSession } from '../../hypervisor/qemu/qmp-session.ts';
import { imageNodes, qemuLaunchArgs, writeLaunchUnit } from '../vm/qemu-launch.ts';
import { readRecord, recoveryFolder, type InstantRecoveryRecord } from './recovery-state.ts';

export interface MigrateOptions {
  /** The datastore folder: the disks go to `<folder>/<name>/<disk>.qcow2`. */
  datastore: string;
  /** How long the copy may take before it is abandoned (the VM then keeps running from the backup). */
  timeoutMs?: number;
  onProgress?: (doneBytes: number, totalBytes: number) => void;
}

export interface MigrateResult {
  name: string;
  folder: string;
  disks: Array<{ name: string; path: string }>;
  launchUnit: { launchJson: string; startScript: string };
  qmpSocketPath: string;
  durationMs: number;
}

/**
 * Moves a running instant recovery onto production storage without stopping it: a `blockdev-mirror` per
 * disk copies the whole chain (the backup under the overlay, and the overlay) into a new qcow2 image while
 * the guest keeps writing (mirror keeps the copy in step), and once every copy has caught up all of them
 * pivot at once; then the overlay and NBD nodes are dropped, the server stops, and the VM runs on its new
 * disks alone. A failure before the pivot cancels the copies and leaves the recovery as it was.
 */
export async function migrateInstantRecovery(home: string, name: string, options: MigrateOptions): Promise<MigrateResult> {
  const started = Date.now();
  const record = await readRecord(home, name);
  if (!record) throw new SnapshiftError('INSTANT_RECOVERY_UNKNOWN', `no instant recovery named ${name} (snapshift instant-recovery list shows what runs)`);
  if (!(await isOwnedProcessAlive(record.vm))) throw new SnapshiftError('INSTANT_RECOVERY_MIGRATE_FAILED', `the VM of instant recovery ${name} no longer runs: nothing to migrate`);
  const folder = join(options.datastore, name);
  await fs.mkdir(folder, { recursive: true });
  const targets = record.disks.map((disk) => ({ disk, path: join(folder, `${disk.name}.qcow2`), node: `${disk.name}-migrated`, job: `snapshift-migrate-${disk.name}` }));
  for (const target of targets) {
    if (await fs.stat(target.path).catch(() => undefined)) throw new SnapshiftError('RESTORE_TARGET_EXISTS', `${target.path} exists: migrate to another datastore, or remove it`);
  }
  await using qmp = await connectQmp(name, record.vm.qmpSocketPath, 10_000);
  let pivoted = false;
  try {
    for (const target of targets) {
      await exec('qemu-img', ['create', '-q', '-f', 'qcow2', target.path, String(target.disk.sizeBytes)]);
      const nodes = imageNodes(target.node, target.path, 'qcow2');
      for (const node of nodes.nodes) await qmp.execute('blockdev-add', node);
      await qmp.execute('blockdev-mirror', { 'job-id': target.job, device: target.disk.nodeName, target: nodes.topNodeName, sync: 'full', 'auto-dismiss': false });
    }
    await waitForAllReady(qmp, targets.map((target) => target.job), options);
    // Every copy is in step: pivot them together, so the VM never runs half on old and half on new disks.
    for (const target of targets) await qmp.execute('job-complete', { id: target.job });
    for (const target of targets) await waitForConcluded(qmp, target.job, 60_000);
    pivoted = true;
    for (const target of targets) {
      await qmp.execute('job-dismiss', { id: target.job });
      // The overlay (on top of the NBD node) goes first; nothing holds them after the pivot.
      await qmp.execute('blockdev-del', { 'node-name': target.disk.nodeName });
      await qmp.execute('blockdev-del', { 'node-name': `${target.disk.name}-overlay-file` });
      await qmp.execute('blockdev-del', { 'node-name': target.disk.backupNodeName });
    }
  } catch (error) {
    if (!pivoted) {
      for (const target of targets) {
        await qmp.execute('job-cancel', { id: target.job }).catch(() => undefined);
        await waitForConcluded(qmp, target.job, 30_000).catch(() => undefined);
        await qmp.execute('job-dismiss', { id: target.job }).catch(() => undefined);
        await qmp.execute('blockdev-del', { 'node-name': `${target.node}-format` }).catch(() => undefined);
        await qmp.execute('blockdev-del', { 'node-name': `${target.node}-file` }).catch(() => undefined);
        await fs.rm(target.path, { force: true });
      }
    }
    throw new SnapshiftError('INSTANT_RECOVERY_MIGRATE_FAILED', `migrating ${name}: ${(error as Error).message}${pivoted ? ' (after the pivot: the VM runs on its new disks)' : '; the VM still runs from the backup'}`, { cause: error });
  }
  await endOwnedProcess(record.server, { graceMs: 5_000 });
  const launchUnit = await writeLaunchUnit(folder, record.vm.runDir, relaunchArgs(record, targets));
  await fs.rm(recoveryFolder(home, name), { recursive: true, force: true });
  return { name, folder, disks: targets.map((target) => ({ name: target.disk.name, path: target.path })), launchUnit, qmpSocketPath: record.vm.qmpSocketPath, durationMs: Date.now() - started };
}

/**
 * The VM as it was started, with its disks now the migrated images: what starts it again after a shutdown
 * (the run folder, and so its QMP socket, stay where they are).
 */
function relaunchArgs(record: InstantRecoveryRecord, targets: ReadonlyArray<{ disk: InstantRecoveryRecord['disks'][number]; path: string }>): string[] {
  const devices = new Map(record.launch.configuration.disks.map((disk) => [disk.name, disk.device ?? null]));
  return qemuLaunchArgs({
    ...record.launch,
    name: record.name,
    runDir: record.vm.runDir,
    disks: targets.map((target) => ({ name: target.disk.name, device: devices.get(target.disk.name) ?? null, ...imageNodes(target.disk.name, target.path, 'qcow2') })),
  });
}

async function waitForAllReady(qmp: QmpSession, jobs: readonly string[], options: MigrateOptions): Promise<void> {
  const deadline = Date.now() + (options.timeoutMs ?? 3_600_000);
  for (;;) {
    const list = await qmp.execute<Array<{ id: string; status: string; 'current-progress': number; 'total-progress': number; error?: string }>>('query-jobs');
    const mine = list.filter((job) => jobs.includes(job.id));
    const failed = mine.find((job) => job.error || job.status === 'concluded' || job.status === 'aborting');
    if (failed) throw new SnapshiftError('INSTANT_RECOVERY_MIGRATE_FAILED', `copy ${failed.id} failed: ${failed.error ?? failed.status}`);
    if (mine.length !== jobs.length) throw new SnapshiftError('INSTANT_RECOVERY_MIGRATE_FAILED', `copy jobs vanished (have ${mine.map((job) => job.id).join(', ') || 'none'})`);
    options.onProgress?.(
      mine.reduce((sum, job) => sum + job['current-progress'], 0),
      mine.reduce((sum, job) => sum + job['total-progress'], 0),
    );
    if (mine.every((job) => job.status === 'ready')) return;
    if (Date.now() > deadline) throw new SnapshiftError('INSTANT_RECOVERY_MIGRATE_FAILED', `the copy did not catch up within ${options.timeoutMs} ms`);
    await qmp
      .waitForEvent('JOB_STATUS_CHANGE', (event: QmpEvent) => jobs.includes(String(event.data?.id)), { timeoutMs: 500 })
      .catch(() => undefined);
  }
}

async function waitForConcluded(qmp: QmpSession, job: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const state = (await qmp.execute<Array<{ id: string; status: string; error?: string }>>('query-jobs')).find((candidate) => candidate.id === job);
    if (!state || state.status === 'concluded' || state.status === 'null') {
      if (state?.error) throw new SnapshiftError('INSTANT_RECOVERY_MIGRATE_FAILED', `copy ${job} failed: ${state.error}`);
      return;
    }
    if (Date.now() > deadline) throw new SnapshiftError('INSTANT_RECOVERY_MIGRATE_FAILED', `copy ${job} did not finish within ${timeoutMs} ms`);
    await qmp.waitForEvent('JOB_STATUS_CHANGE', (event: QmpEvent) => event.data?.id === job, { timeoutMs: 500 }).catch(() => undefined);
  }
}
