import type { Catalog, VmTarget } from '../catalog/index.ts';
import { CleanupStack } from '../core/cleanup-stack.ts';
import { SnapshiftError, messageOf } from '../core/errors.ts';
import { exportImageReadOnly } from '../datamover/image-exporter.ts';
import type { HypervisorVm, QuiescePlan, VmCbtPlan, VmConfiguration, VmDisk, VmSnapshot, VmSnapshotStats } from '../hypervisor/hypervisor.ts';
import { openVm } from '../hypervisor/registry.ts';
import type { BackupWriter, Repository } from '../repository/index.ts';
import { locateImage, storageSystems, type LocatedImage } from '../storage/registry.ts';
import { hasSnapshotDiffing, type StorageSnapshot, type StorageSystem, type Volume } from '../storage/storage-system.ts';
import { planSnapshotDiffChangedBlocks, type VmSnapshotDiffPlan } from './snapshot-diff-cbt.ts';
import { cbtInputOf } from './cbt-chain-key.ts';
import { vmSnapshotLedger, type BackupTaskResult } from './regular-mode.ts';
import { summarizeTask } from './task-stats.ts';
import { copyVmDisks, type VmDiskCopy } from './vm-copy.ts';
import type { TaskTuning } from './task-options.ts';
import { faultPoint } from '../core/fault-points.ts';

export interface StorageGroupInput extends TaskTuning {
  vms: readonly VmTarget[];
  repository: Repository;
  catalog: Catalog;
  runDir: string;
  sessionId: string;
  /** Continue in regular mode when the storage snapshot cannot be taken (default on). */
  failoverToRegular: boolean;
  systems?: readonly StorageSystem[];
  /** Read every disk in full, even where changed-block tracking could limit the read (`backup --full`). */
  full?: boolean;
  /** Test hooks at the two moments a crash matters most. */
  hooks?: { afterStorageSnapshot?: () => Promise<void> | void; beforeVmSnapshots?: () => Promise<void> | void; afterVmSnapshots?: () => Promise<void> | void };
}

export interface GroupTaskOutcome {
  vmName: string;
  result?: BackupTaskResult & { failoverReason?: string; storageKinds: string[] };
  error?: Error;
  /** With `error`: non-fatal problems met while undoing the failed task (a succeeded one has result.warnings). */
  warnings?: string[];
}

/** One VM of the group, as it moves through the steps. */
interface GroupMember {
  record: VmTarget;
  vm: HypervisorVm;
  disks: VmDisk[];
  configuration: VmConfiguration;
  located: LocatedImage[];
  writer: BackupWriter;
  quiescePlan: QuiescePlan;
  cbt: VmCbtPlan;
  /** rbd diff for RBD disks: preferred over the bitmap where both apply (docs/CBT.md). */
  rbdCbt: VmSnapshotDiffPlan;
  vmSnapshot?: VmSnapshot;
  vmSnapshotStats?: VmSnapshotStats;
  error?: Error;
}

/**
 * Backup from storage snapshots for a group of VMs that share volumes: VM snapshots of all → one storage
 * snapshot per storage system → commit every VM snapshot at once → copy each VM from the storage snapshot
 * → remove it. If the storage snapshot fails, each VM goes on in regular mode with its VM snapshot (failover),
 * or the group fails cleanly with every VM snapshot committed.
 */
export async function backupGroupFromStorageSnapshots(input: StorageGroupInput): Promise<GroupTaskOutcome[]> {
  const cleanup = new CleanupStack();
  const outcomes: GroupTaskOutcome[] = [];
  let failure: unknown;
  try {
    await backupGroup(input, cleanup, outcomes);
  } catch (error) {
    failure = error;
  }
  try {
    await cleanup[Symbol.asyncDispose]();
  } catch (error) {
    failure ??= error;
  }
  if (failure !== undefined) throw new GroupUndoFailed(outcomes, failure);
  return outcomes;
}

/**
 * The group's work or its undo failed after some VMs may already have a committed restore point: those keep
 * it (the failure becomes their warning); the caller must still remove what the group left (hunter's path).
 */
export class GroupUndoFailed extends SnapshiftError {
  constructor(
    readonly outcomes: readonly GroupTaskOutcome[],
    cause: unknown,
  ) {
    super('STORAGE_GROUP_UNDO_FAILED', messageOf(cause), { cause });
  }
}

async function backupGroup(input: StorageGroupInput, cleanup: CleanupStack, outcomes: GroupTaskOutcome[]): Promise<void> {
  const started = performance.now();
  const tag = input.sessionId.slice(0, 8);
  const systems = input.systems ?? storageSystems();
  const members: GroupMember[] = [];

  for (const record of input.vms) {
    try {
      const vm = cleanup.use(`connection to VM ${record.name}`, await openVm(record));
      const disks = await vm.listDisks();
      input.catalog.recordDisks(record.name, disks.map((disk) => ({ ...disk })));
      const configuration = await vm.captureConfiguration();
      const located: LocatedImage[] = [];
      for (const disk of disks) {
        const where = await locateImage(disk.imagePath, systems);
        if (!where) throw new StorageUnsupported(`disk ${disk.name} (${disk.imagePath}) is on no storage system snapshift can snapshot`);
        located.push(where);
      }
      const cbt = await vm.planChangedBlocks(disks, await cbtInputOf(input.repository, record.name, { tag, full: input.full, runDir: input.runDir }));
      const rbdCbt = await planSnapshotDiffChangedBlocks({
        vmName: record.name,
        disks,
        latest: (await input.repository.listRestorePoints(record.name)).find((point) => point.id === cbt.baseRestorePointId),
        tag,
        full: input.full,
        systemFor: (disk) => {
          const system = located[disks.indexOf(disk)]?.system;
          return system && hasSnapshotDiffing(system) ? system : undefined;
        },
      });
      const writer = await input.repository.startBackup({ vmName: record.name, baseRestorePointId: cbt.baseRestorePointId });
      faultPoint('backup.after-writer-start');
      cleanup.defer(`abort unfinished restore point of ${record.name}`, async () => {
        if (!outcomes.some((outcome) => outcome.vmName === record.name && outcome.result)) {
          await writer.abort();
          const warnings = await cbt.finish(false);
          const failed = outcomes.find((outcome) => outcome.vmName === record.name);
          if (failed && warnings.length > 0) failed.warnings = [...(failed.warnings ?? []), ...warnings];
        }
      });
      const quiescePlan = cleanup.use(`guest agent of ${record.name}`, await vm.prepareQuiesce(input.quiesce ?? false));
      members.push({ record, vm, disks, configuration, located, writer, cbt, rbdCbt, quiescePlan });
    } catch (error) {
      outcomes.push({ vmName: record.name, error: error as Error });
    }
  }
  if (members.length === 0) return;

  // 1. VM snapshots of the whole group.
  await input.hooks?.beforeVmSnapshots?.();
  for (const member of members) {
    try {
      member.vmSnapshot = await member.vm.snapshot(member.disks, {
        tag,
        quiesce: member.quiescePlan.quiesce,
        overlayFolder: input.overlayFolder,
        cbt: member.cbt,
        ledger: vmSnapshotLedger(input.catalog, member.record, input.sessionId),
      });
      cleanup.defer(`commit the VM snapshot of ${member.record.name}`, async () => {
        await member.vmSnapshot!.commit();
      });
    } catch (error) {
      member.error = error as Error;
    }
  }
  await input.hooks?.afterVmSnapshots?.();
  const snapshotted = members.filter((member) => member.vmSnapshot);

  // 2. One storage snapshot per storage system, taken while every VM snapshot holds its bases still.
  const storageSnapshots: StorageSnapshot[] = [];
  let failoverReason: string | undefined;
  try {
    for (const system of systems) {
      const images = snapshotted.flatMap((member) => member.located.filter((where) => where.system === system).map((where) => where.imagePath));
      if (images.length === 0) continue;
      const volumes = uniqueVolumes(snapshotted.flatMap((member) => member.located.filter((where) => where.system === system).map((where) => where.volume)));
      const ledgerId = input.catalog.recordStorageSnapshotIntent({
        vmNames: snapshotted.map((member) => member.record.name),
        ownerPid: process.pid,
        sessionId: input.sessionId,
        systemKind: system.kind,
        volumes: volumes.map((volume) => ({ kind: volume.kind, id: volume.id })),
        sessionTag: tag,
      });
      faultPoint('storage-snapshot.after-ledger-intent');
      let snapshot: StorageSnapshot;
      try {
        snapshot = await system.snapshot(volumes, tag, images);
      } catch (error) {
        input.catalog.clearLedgerEntry(ledgerId);
        throw error;
      }
      faultPoint('storage-snapshot.after-snapshot');
      storageSnapshots.push(snapshot);
      cleanup.defer(`remove the ${system.kind} storage snapshot`, async () => {
        faultPoint('storage-snapshot.after-copy');
        await snapshot[Symbol.asyncDispose]();
        faultPoint('storage-snapshot.after-removal');
        input.catalog.clearLedgerEntry(ledgerId);
      });
    }
  } catch (error) {
    failoverReason = `storage snapshot failed: ${messageOf(error)}`;
    if (!input.failoverToRegular) {
      for (const member of snapshotted) member.error = new SnapshiftError('STORAGE_SNAPSHOT_FAILED', `${failoverReason} (failover to regular mode is off)`, { cause: error });
    }
  }

  // 3. With the storage snapshot in hand, the VM snapshots have done their job: commit them now.
  const useStorage = failoverReason === undefined;
  if (useStorage || !input.failoverToRegular) {
    for (const member of snapshotted) {
      try {
        member.vmSnapshotStats = await member.vmSnapshot!.commit();
      } catch (error) {
        member.error ??= error as Error;
      }
    }
  }

  if (useStorage) await input.hooks?.afterStorageSnapshot?.();

  // 4. Copy each VM: from the storage snapshot, or (failover) from its still-frozen base in regular mode.
  for (const member of members) {
    if (member.error) {
      outcomes.push({ vmName: member.record.name, error: member.error });
      continue;
    }
    const memberStarted = performance.now();
    const totalBytes = member.disks.reduce((total, disk) => total + disk.virtualSizeBytes, 0);
    try {
      const copyOptions = {
        chunkSizeBytes: input.repository.chunkSizeBytes,
        readAhead: input.readAhead,
        maxReadBytesPerSecond: input.maxReadBytesPerSecond,
        signal: input.signal,
        onProgress: (processedBytes: number) => input.onProgress?.({ vmName: member.record.name, phase: 'copy', processedBytes, totalBytes }),
        // Read from the storage snapshot, an RBD disk's changes come from rbd diff; on failover there is no new
        // RBD snapshot to diff against, so the bitmap plan stands.
        readPlans: useStorage ? new Map([...member.cbt.readPlans, ...member.rbdCbt.readPlans]) : member.cbt.readPlans,
      };
      if (useStorage) member.rbdCbt.useStorageSnapshots(storageSnapshots);
      let copies: VmDiskCopy[];
      if (useStorage) {
        copies = await copyVmDisks(
          member.writer,
          member.disks,
          (disk, index) =>
            exportImageReadOnly({
              imagePath: snapshotHolding(storageSnapshots, disk.imagePath),
              format: disk.format,
              runDir: input.runDir,
              exportName: `snapshift-${tag}-${member.record.name}-${index}`,
            }),
          copyOptions,
        );
      } else {
        copies = await copyVmDisks(
          member.writer,
          member.disks,
          (disk, index) => member.vm.exportFrozenDisk(disk, index, { tag, runDir: input.runDir }),
          copyOptions,
        );
        faultPoint('copy.after-copy');
        member.vmSnapshotStats = await member.vmSnapshot!.commit();
      }
      const storageKinds = [...new Set(member.located.map((where) => where.system.kind))];
      const storageSnapshotLifetimeMs = useStorage ? Math.max(...storageSnapshots.map((snapshot) => snapshot.lifetimeMs)) : undefined;
      const mode = useStorage ? 'storage-snapshot' : 'regular';
      const writerStats = await member.writer.settle();
      const stats = summarizeTask({
        mode,
        durationMs: performance.now() - (members.length === 1 ? started : memberStarted),
        copies,
        writer: writerStats,
        workerCount: input.repository.workerCount,
        vmSnapshot: member.vmSnapshotStats!,
        storageSnapshotLifetimeMs,
        quiesceNote: member.quiescePlan.note,
      });
      const restorePoint = await member.writer.commit({
        mode,
        sessionId: input.sessionId,
        storage: storageKinds,
        failoverReason,
        disks: member.disks.map((disk) => ({ name: disk.name, format: disk.format, imagePath: disk.imagePath, virtualSizeBytes: disk.virtualSizeBytes })),
        stats,
        cbt: member.cbt.record,
        vmConfiguration: member.configuration,
        ...(useStorage ? { rbdCbt: member.rbdCbt.record } : {}),
      });
      input.catalog.addRestorePoint({
        id: restorePoint.id,
        vmName: member.record.name,
        repositoryPath: input.repository.path,
        createdAt: restorePoint.createdAt,
        mode,
        // The hunter keeps a retained CBT base only while a restore point here names it.
        stats: { ...stats, failoverReason, storageKinds, ...(useStorage ? { retainedSnapshots: member.rbdCbt.retainedLocations } : {}) },
      });
      faultPoint('backup.after-catalog-record');
      const warnings: string[] = [];
      outcomes.push({ vmName: member.record.name, result: { restorePoint, stats, recovered: [], failoverReason, storageKinds, warnings } });
      warnings.push(...(await member.cbt.finish(true)));
      faultPoint('cbt.after-finish');
      // Before the storage snapshot is removed: this run's RBD snapshot becomes the base of the next diff.
      if (useStorage) warnings.push(...(await member.rbdCbt.retain(storageSnapshots)));
    } catch (error) {
      outcomes.push({ vmName: member.record.name, error: error as Error });
    }
  }
}

/** Raised when a VM's disks are on storage no provider can snapshot: a reason to fail over. */
export class StorageUnsupported extends SnapshiftError {
  constructor(message: string) {
    super('STORAGE_UNSUPPORTED', message);
  }
}

function uniqueVolumes(volumes: readonly Volume[]): Volume[] {
  const byKey = new Map(volumes.map((volume) => [`${volume.kind}:${volume.id}`, volume]));
  return [...byKey.values()];
}

function snapshotHolding(snapshots: readonly StorageSnapshot[], imagePath: string): string {
  for (const snapshot of snapshots) {
    try {
      return snapshot.imageAt(imagePath);
    } catch {
      // not in this one; try the next system's snapshot
    }
  }
  throw new SnapshiftError('STORAGE_IMAGE_NOT_IN_SNAPSHOT', `${imagePath} is in no storage snapshot of this session`);
}
