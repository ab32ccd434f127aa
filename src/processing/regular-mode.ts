import { randomUUID } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import type { Catalog, VmTarget } from '../catalog/index.ts';
import type { SnapshotLedger, VmSnapshotStats } from '../hypervisor/hypervisor.ts';
import { openVm } from '../hypervisor/registry.ts';
import type { Repository, RestorePointSummary } from '../repository/index.ts';
import { cbtInputOf } from './cbt-chain-key.ts';
import { huntVmSnapshots, type HuntAction } from './snapshot-hunter.ts';
import { summarizeTask, type TaskStats } from './task-stats.ts';
import { copyVmDisks, type VmDiskCopy } from './vm-copy.ts';
import type { TaskTuning } from './task-options.ts';
import { faultPoint } from '../core/fault-points.ts';

export interface TaskProgress {
  vmName: string;
  phase: 'snapshot' | 'copy' | 'commit' | 'finalize';
  processedBytes: number;
  totalBytes: number;
}

export interface BackupTaskInput extends TaskTuning {
  vm: VmTarget;
  repository: Repository;
  catalog: Catalog;
  /** Sockets and other per-run files go here. */
  runDir: string;
  sessionId?: string;
  /** Why a storage-snapshot task runs in regular mode instead; recorded with the restore point. */
  failoverReason?: string;
  /** Read every disk in full, even where changed-block tracking could limit the read (`backup --full`). */
  full?: boolean;
  /** The run already hunted leftovers before its first task. */
  skipHunt?: boolean;
  /** Called at the moments a crash matters most (tests use them to write, measure or kill). */
  hooks?: { afterVmSnapshots?: () => Promise<void> | void };
  /** Non-fatal problems met while undoing a task that fails are appended here (one that succeeds returns its own). */
  undoWarnings?: string[];
}

export interface BackupTaskResult {
  restorePoint: RestorePointSummary;
  stats: TaskStats;
  /** What the snapshot hunter cleaned up before this backup. */
  recovered: HuntAction[];
  /** Non-fatal problems: the restore point is good, but something around it went wrong (e.g. a cleanup). */
  warnings?: string[];
}

/**
 * Regular processing of one VM: VM snapshot → copy the frozen base through the VM's own NBD export →
 * commit the snapshot → write the restore point. The VM snapshot is committed on every path out.
 */
export async function backupVmRegular(input: BackupTaskInput): Promise<BackupTaskResult> {
  const sessionId = input.sessionId ?? randomUUID();
  mkdirSync(input.runDir, { recursive: true });
  // Before we hold the QMP connection (QEMU serves one client at a time): clean what a crash left.
  const recovered = input.skipHunt ? [] : await huntVmSnapshots(input.catalog, { vmName: input.vm.name });
  if (!input.skipHunt) faultPoint('backup.after-hunt');
  try {
    return { ...(await runRegularTask(input, sessionId)), recovered };
  } catch (error) {
    // The commit itself may have failed (QMP connection lost): with our connection closed, retry it the
    // way the hunter would, so the guest is not left on the overlay.
    const ours = input.catalog.listVmSnapshotLedger(input.vm.name).filter((entry) => entry.sessionId === sessionId);
    if (ours.length > 0) await huntVmSnapshots(input.catalog, { vmName: input.vm.name, includeEntries: ours.map((entry) => entry.id) }).catch(() => undefined);
    throw error;
  }
}

async function runRegularTask(input: BackupTaskInput, sessionId: string): Promise<Omit<BackupTaskResult, 'recovered'>> {
  const started = performance.now();
  const { vm: target, catalog, repository } = input;
  const tag = sessionId.slice(0, 8);

  await using vm = await openVm(target);
  const disks = await vm.listDisks();
  catalog.recordDisks(target.name, disks.map((disk) => ({ ...disk })));
  const configuration = await vm.captureConfiguration();
  const totalBytes = disks.reduce((total, disk) => total + disk.virtualSizeBytes, 0);
  const report = (phase: TaskProgress['phase'], processedBytes: number) =>
    input.onProgress?.({ vmName: target.name, phase, processedBytes, totalBytes });

  await using quiescePlan = await vm.prepareQuiesce(input.quiesce ?? false);
  const cbt = await vm.planChangedBlocks(disks, await cbtInputOf(repository, target.name, { tag, full: input.full, runDir: input.runDir }));
  const writer = await repository.startBackup({ vmName: target.name, baseRestorePointId: cbt.baseRestorePointId });
  faultPoint('backup.after-writer-start');
  let committed = false;
  try {
    report('snapshot', 0);
    const copies: VmDiskCopy[] = [];
    let vmSnapshotStats: VmSnapshotStats;
    {
      await using vmSnapshot = await vm.snapshot(disks, {
        tag,
        quiesce: quiescePlan.quiesce,
        overlayFolder: input.overlayFolder,
        cbt,
        ledger: vmSnapshotLedger(catalog, target, sessionId),
      });
      await input.hooks?.afterVmSnapshots?.();
      copies.push(
        ...(await copyVmDisks(
          writer,
          disks,
          (disk, index) => vm.exportFrozenDisk(disk, index, { tag, runDir: input.runDir }),
          {
            chunkSizeBytes: repository.chunkSizeBytes,
            readAhead: input.readAhead,
            maxReadBytesPerSecond: input.maxReadBytesPerSecond,
            signal: input.signal,
            onProgress: (processed) => report('copy', processed),
            readPlans: cbt.readPlans,
          },
        )),
      );
      faultPoint('copy.after-copy');
      report('commit', totalBytes);
      vmSnapshotStats = await vmSnapshot.commit();
    }
    report('finalize', totalBytes);
    const writerStats = await writer.settle();
    const stats = summarizeTask({ mode: 'regular', durationMs: performance.now() - started, copies, writer: writerStats, workerCount: repository.workerCount, vmSnapshot: vmSnapshotStats, quiesceNote: quiescePlan.note });
    const restorePoint = await writer.commit({
      mode: 'regular',
      sessionId,
      failoverReason: input.failoverReason,
      disks: disks.map((disk) => ({ name: disk.name, format: disk.format, imagePath: disk.imagePath, virtualSizeBytes: disk.virtualSizeBytes })),
      stats,
      cbt: cbt.record,
      vmConfiguration: configuration,
    });
    committed = true;
    const warnings = await cbt.finish(true);
    faultPoint('cbt.after-finish');
    catalog.addRestorePoint({ id: restorePoint.id, vmName: target.name, repositoryPath: repository.path, createdAt: restorePoint.createdAt, mode: 'regular', stats: { ...stats, failoverReason: input.failoverReason } });
    faultPoint('backup.after-catalog-record');
    return { restorePoint, stats, ...(warnings.length > 0 ? { warnings } : {}) };
  } finally {
    if (!committed) {
      await writer.abort();
      input.undoWarnings?.push(...(await cbt.finish(false)));
    }
  }
}

/** The ledger as a VM snapshot of `vm` writes it: the intent before the hypervisor is asked, cleared after the commit. */
export function vmSnapshotLedger(catalog: Catalog, vm: VmTarget, sessionId: string): SnapshotLedger {
  return {
    recordIntent: (overlays, adapter) =>
      catalog.recordVmSnapshotIntent({
        vmName: vm.name,
        hostName: vm.host.name,
        qmpSocketPath: vm.host.kind === 'qemu' ? vm.host.qmpSocketPath : '',
        ownerPid: process.pid,
        sessionId,
        overlays: [...overlays],
        adapter: { kind: vm.host.kind, ...adapter },
      }),
    clear: (id) => catalog.clearLedgerEntry(id),
  };
}
