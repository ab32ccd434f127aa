import { randomUUID } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import type { Catalog, VmTarget } from '../catalog/index.ts';
import { openVm } from '../hypervisor/registry.ts';
import type { Repository } from '../repository/index.ts';
import { locateImage, storageSystems } from '../storage/registry.ts';
import type { StorageSystem } from '../storage/storage-system.ts';
import { backupVmRegular, type BackupTaskResult } from './regular-mode.ts';
import { huntOverlaysOnHosts, huntVmSnapshots, type HuntAction } from './snapshot-hunter.ts';
import { huntStorageSnapshots, type StorageHuntAction } from './storage-hunter.ts';
import { backupGroupFromStorageSnapshots, GroupUndoFailed, StorageUnsupported } from './storage-snapshot-mode.ts';
import { messageOf } from '../core/errors.ts';
import type { TaskTuning } from './task-options.ts';
import { faultPoint } from '../core/fault-points.ts';

export const processingModes = ['storage-snapshot', 'regular', 'fleecing'] as const;
export type ProcessingMode = (typeof processingModes)[number];

/** `storage-snapshot, regular or fleecing`, for messages. */
export const processingModeList = `${processingModes.slice(0, -1).join(', ')} or ${processingModes.at(-1)}`;

export function isProcessingMode(mode: unknown): mode is ProcessingMode {
  return processingModes.includes(mode as ProcessingMode);
}

export interface BackupRunInput extends TaskTuning {
  /** The VMs to back up, each with the host that serves it (`catalog.getVm`). */
  vms: readonly VmTarget[];
  mode: ProcessingMode;
  repository: Repository;
  catalog: Catalog;
  runDir: string;
  failoverToRegular?: boolean;
  vmsPerStorageSnapshot?: number;
  systems?: readonly StorageSystem[];
  /** Tasks (a VM in regular mode, a group in storage-snapshot mode) that run at once; default 1. */
  parallel?: number;
  /** Session id to use (a job runner makes one first); default a new one. */
  sessionId?: string;
  /** Read every disk in full, even where changed-block tracking could limit the read (`backup --full`). */
  full?: boolean;
}

export interface VmOutcome {
  vmName: string;
  /** `warnings`: the restore point is good, but something around it went wrong (e.g. removing a snapshot). */
  result?: BackupTaskResult & { failoverReason?: string; storageKinds?: string[] };
  error?: Error;
  /** With `error`: non-fatal problems met while undoing the failed task (e.g. dirty bitmaps not cleaned up). */
  warnings?: string[];
}

export interface BackupRunResult {
  sessionId: string;
  outcomes: VmOutcome[];
  storageSnapshotCount: number;
  hunted: { vmSnapshots: HuntAction[]; storageSnapshots: StorageHuntAction[] };
}

/**
 * One backup run over several VMs: hunt leftovers first, then either regular tasks one by one, or groups of
 * VMs sharing volumes (at most N per storage snapshot) in storage-snapshot mode. A VM whose disks no storage
 * system can snapshot fails over to regular mode (unless failover is off). One VM's failure never stops others.
 */
export async function runBackup(input: BackupRunInput): Promise<BackupRunResult> {
  const sessionId = input.sessionId ?? randomUUID();
  mkdirSync(input.runDir, { recursive: true });
  if (input.overlayFolder !== undefined) mkdirSync(input.overlayFolder, { recursive: true });
  const systems = input.systems ?? storageSystems();
  const hunted = {
    vmSnapshots: [...(await huntVmSnapshots(input.catalog)), ...(await huntOverlaysOnHosts(input.catalog))],
    storageSnapshots: await huntStorageSnapshots(input.catalog, { systems }),
  };
  faultPoint('backup.after-hunt');
  const failover = input.failoverToRegular ?? true;
  const outcomes: VmOutcome[] = [];
  let storageSnapshotCount = 0;

  const runRegular = async (vm: VmTarget, failoverReason?: string) => {
    const undoWarnings: string[] = [];
    try {
      input.signal?.throwIfAborted();
      const pointInTime = input.mode === 'fleecing' ? 'fleecing' : 'vm-snapshot';
      const result = await backupVmRegular({ ...input, vm, sessionId, pointInTime, failoverReason, skipHunt: true, undoWarnings });
      outcomes.push({ vmName: vm.name, result: { ...result, failoverReason } });
    } catch (error) {
      outcomes.push({ vmName: vm.name, error: error as Error, ...(undoWarnings.length > 0 ? { warnings: undoWarnings } : {}) });
    }
  };

  const parallel = Math.max(1, input.parallel ?? 1);
  if (input.mode === 'regular' || input.mode === 'fleecing') {
    await forEachConcurrently(input.vms, parallel, (vm) => runRegular(vm));
    return { sessionId, outcomes, storageSnapshotCount, hunted };
  }

  const { groups, unsupported, failed } = await groupByVolume(input.vms, systems, input.vmsPerStorageSnapshot ?? 10);
  outcomes.push(...failed);
  const units: Array<() => Promise<void>> = [
    ...unsupported.map(({ vm, reason }) => async () => {
      if (failover) await runRegular(vm, reason);
      else outcomes.push({ vmName: vm.name, error: new StorageUnsupported(`${reason} (failover to regular mode is off; the VM was not touched)`) });
    }),
    ...groups.map((group) => async () => {
      if (input.signal?.aborted) {
        outcomes.push(...group.map((vm) => ({ vmName: vm.name, error: new Error('stopped before it started') })));
        return;
      }
      // Each group names its snapshots with its own tag: groups that run at once on one file system (or one
      // volume split by the per-snapshot limit) would otherwise both want `snapshift-<tag>-0`.
      const groupSessionId = groups.length === 1 ? sessionId : randomUUID();
      try {
        const groupOutcomes = await backupGroupFromStorageSnapshots({ ...input, vms: group, sessionId: groupSessionId, failoverToRegular: failover, systems });
        if (groupOutcomes.some((outcome) => outcome.result?.stats.mode === 'storage-snapshot')) storageSnapshotCount++;
        outcomes.push(...groupOutcomes);
      } catch (error) {
        // Undoing a snapshot failed (e.g. the QMP connection broke during the commit): retry the way the
        // hunter would, on fresh connections, so no guest is left on an overlay and no storage snapshot stays.
        // VMs whose restore point was committed keep it: the failed undo is their warning, not their failure.
        const done = error instanceof GroupUndoFailed ? error.outcomes : [];
        const recovery = await recoverSession(input.catalog, groupSessionId, group.map((vm) => vm.name), systems);
        const warning = `${messageOf(error)}${recovery}`;
        for (const vm of group) {
          const outcome = done.find((candidate) => candidate.vmName === vm.name);
          if (outcome?.result) outcomes.push({ ...outcome, result: { ...outcome.result, warnings: [...(outcome.result.warnings ?? []), warning] } });
          else outcomes.push({ vmName: vm.name, error: outcome?.error ?? (error as Error), ...(outcome?.warnings ? { warnings: outcome.warnings } : {}) });
        }
      }
    }),
  ];
  await forEachConcurrently(units, parallel, (unit) => unit());
  return { sessionId, outcomes, storageSnapshotCount, hunted };
}

/**
 * Groups VMs whose disks share a volume (so one storage snapshot serves them), at most `maxPerGroup` each.
 * Listing disks opens each VM briefly (a QMP connection, a virsh call), closed before the group opens its own.
 */
async function groupByVolume(vms: readonly VmTarget[], systems: readonly StorageSystem[], maxPerGroup: number) {
  const groupsByKey = new Map<string, VmTarget[]>();
  const unsupported: Array<{ vm: VmTarget; reason: string }> = [];
  const failed: VmOutcome[] = [];
  for (const vm of vms) {
    try {
      const volumeKeys: string[] = [];
      {
        await using opened = await openVm(vm);
        for (const disk of await opened.listDisks()) {
          const where = await locateImage(disk.imagePath, systems);
          if (!where) throw new StorageUnsupported(`disk ${disk.name} (${disk.imagePath}) is on no storage system snapshift can snapshot`);
          volumeKeys.push(`${where.system.kind}:${where.volume.id}`);
        }
      }
      const key = [...new Set(volumeKeys)].sort().join('|');
      groupsByKey.set(key, [...(groupsByKey.get(key) ?? []), vm]);
    } catch (error) {
      if (error instanceof StorageUnsupported) unsupported.push({ vm, reason: error.message });
      else failed.push({ vmName: vm.name, error: error as Error });
    }
  }
  const groups: VmTarget[][] = [];
  for (const members of groupsByKey.values()) {
    for (let index = 0; index < members.length; index += maxPerGroup) groups.push(members.slice(index, index + maxPerGroup));
  }
  return { groups, unsupported, failed };
}

/** Runs `work` over `items` with at most `limit` at once; a rejection is the caller's to avoid (tasks catch their own). */
async function forEachConcurrently<T>(items: readonly T[], limit: number, work: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const lanes = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) await work(items[next++]!);
  });
  await Promise.all(lanes);
}

/**
 * Removes what this session left for the given VMs after its own undo failed. Never throws; returns a note
 * for the warning: what the retry removed, or what is still left for `snapshift hunt`.
 */
async function recoverSession(catalog: Catalog, sessionId: string, vmNames: readonly string[], systems: readonly StorageSystem[]): Promise<string> {
  const entries = catalog.listVmSnapshotLedger().filter((entry) => entry.sessionId === sessionId && vmNames.includes(entry.vmName));
  const left: string[] = [];
  try {
    if (entries.length > 0) {
      const actions = await huntVmSnapshots(catalog, { includeEntries: entries.map((entry) => entry.id) });
      left.push(...actions.filter((action) => action.action === 'left-in-place').map((action) => action.overlayPath));
    }
    const storageActions = await huntStorageSnapshots(catalog, { systems, forceSessionTags: [sessionId.slice(0, 8)] });
    left.push(...storageActions.filter((action) => action.action === 'failed').map((action) => action.location));
  } catch (error) {
    return `; the retry failed too (${messageOf(error)}): run "snapshift hunt"`;
  }
  return left.length === 0 ? '; removed on retry' : `; still left, run "snapshift hunt": ${left.join(', ')}`;
}
