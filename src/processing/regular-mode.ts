import { randomUUID } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import type { Catalog, VmTarget } from '../catalog/index.ts';
import type { DiskExport, FleeceStats, HypervisorVm, QuiescePlan, SnapshotLedger, VmCbtPlan, VmDisk, VmSnapshotStats } from '../hypervisor/hypervisor.ts';
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
  /**
   * How the point in time is held while the disks are read: a VM snapshot (regular processing, the default) or
   * fleecing (copy-before-write: no delta file, no commit).
   */
  pointInTime?: 'vm-snapshot' | 'fleecing';
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
  /** `beforeVmSnapshots`/`afterVmSnapshots` bracket the point in time (a VM snapshot or the fleecing start). */
  hooks?: { beforeVmSnapshots?: () => Promise<void> | void; afterVmSnapshots?: () => Promise<void> | void };
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
 * With `pointInTime: 'fleecing'` the same task holds the point in time by fleecing instead: the guest's
 * writes copy old blocks to a scratch image, the disks are read through the fleecing node, and releasing it
 * removes the scratch (nothing to commit).
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
  const mode = input.pointInTime === 'fleecing' ? 'fleecing' : 'regular';

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
    let held: HeldStats;
    {
      await input.hooks?.beforeVmSnapshots?.();
      await using pointInTime = await holdPointInTime(vm, disks, mode, { input, sessionId, tag, quiescePlan, cbt });
      await input.hooks?.afterVmSnapshots?.();
      copies.push(
        ...(await copyVmDisks(
          writer,
          disks,
          (disk, index) => pointInTime.exportDisk(disk, index),
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
      held = await pointInTime.end();
    }
    report('finalize', totalBytes);
    const writerStats = await writer.settle();
    const stats = summarizeTask({ mode, durationMs: performance.now() - started, copies, writer: writerStats, workerCount: repository.workerCount, ...held, quiesceNote: quiescePlan.note });
    const restorePoint = await writer.commit({
      mode,
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
    catalog.addRestorePoint({ id: restorePoint.id, vmName: target.name, repositoryPath: repository.path, createdAt: restorePoint.createdAt, mode, stats: { ...stats, failoverReason: input.failoverReason } });
    faultPoint('backup.after-catalog-record');
    return { restorePoint, stats, ...(warnings.length > 0 ? { warnings } : {}) };
  } finally {
    if (!committed) {
      await writer.abort();
      input.undoWarnings?.push(...(await cbt.finish(false)));
    }
  }
}

/** What holding the point in time cost the guest: a VM snapshot's figures, or fleecing's (no delta, no commit). */
interface HeldStats {
  vmSnapshot: VmSnapshotStats;
  fleece?: FleeceStats;
}

/** The point in time of a VM task, held while its disks are read; disposal undoes it on every path out. */
interface HeldPointInTime extends AsyncDisposable {
  exportDisk(disk: VmDisk, index: number): Promise<DiskExport>;
  /** Ends it once the copy is done: commits the VM snapshot, or checks and releases the fleecing. */
  end(): Promise<HeldStats>;
}

async function holdPointInTime(
  vm: HypervisorVm,
  disks: readonly VmDisk[],
  mode: 'regular' | 'fleecing',
  context: { input: BackupTaskInput; sessionId: string; tag: string; quiescePlan: QuiescePlan; cbt: VmCbtPlan },
): Promise<HeldPointInTime> {
  const { input, sessionId, tag, quiescePlan, cbt } = context;
  const ledger = vmSnapshotLedger(input.catalog, input.vm, sessionId);
  if (mode === 'fleecing') {
    const fleece = await vm.startFleecing(disks, { tag, ledger, runDir: input.runDir, scratchFolder: input.overlayFolder, quiesce: quiescePlan.quiesce, cbt });
    return {
      exportDisk: (disk, index) => fleece.exportDisk(disk, index),
      async end() {
        // A fleecing whose scratch broke (full, I/O error) lets the guest's writes through unsaved: the copy
        // read a mix of two instants, so no restore point may come of it.
        await fleece.verifyIntact?.();
        const stats = await fleece.release();
        return { vmSnapshot: { lifetimeMs: 0, deltaBytesAtCommit: 0, commitMs: 0 }, fleece: stats };
      },
      [Symbol.asyncDispose]: () => fleece[Symbol.asyncDispose](),
    };
  }
  const vmSnapshot = await vm.snapshot(disks, { tag, quiesce: quiescePlan.quiesce, overlayFolder: input.overlayFolder, cbt, ledger });
  return {
    exportDisk: (disk, index) => vm.exportFrozenDisk(disk, index, { tag, runDir: input.runDir }),
    end: async () => ({ vmSnapshot: await vmSnapshot.commit() }),
    [Symbol.asyncDispose]: () => vmSnapshot[Symbol.asyncDispose](),
  };
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
