import { SnapshiftError, messageOf } from '../core/errors.ts';
import { perDiskRecordOf, type ChangedBlockSource, type DiskReadPlan } from '../datamover/changed-blocks.ts';
import type { Region } from '../datamover/extent-map.ts';
import type { VmDisk } from '../hypervisor/hypervisor.ts';
import type { RestorePointSummary } from '../repository/index.ts';
import type { SnapshotDiffing, StorageSnapshot } from '../storage/storage-system.ts';

/**
 * What a restore point records per disk on a diffing storage system: the retained snapshot that is the base of
 * the next diff. Kept under `extra.rbdCbt` (docs/FORMAT.md): Ceph RBD is the one such system today.
 */
export interface SnapshotDiffDiskRecord {
  /** The system's image (`pool/image` or `pool/namespace/image`). */
  image: string;
  /** The retained snapshot holding this restore point's content, e.g. `snapshift-cbt-<tag>`. */
  snapshot: string;
  virtualSizeBytes: number;
}

/** Stored as `extra.rbdCbt` of a restore point. */
export interface SnapshotDiffRecord {
  disks: Record<string, SnapshotDiffDiskRecord>;
}

/** Per diffing disk of one VM task: how it is read, and what the restore point records. */
export interface VmSnapshotDiffPlan {
  /** Only the disks on a diffing system: `changed` (the diff is trusted) or `full` with the reason it is not. */
  readonly readPlans: ReadonlyMap<string, DiskReadPlan>;
  readonly record: SnapshotDiffRecord;
  /** `pool/image@snapshift-cbt-<tag>` of every such disk: what the catalog lists so the hunter keeps them. */
  readonly retainedLocations: readonly string[];
  /**
   * After the restore point is written: the storage snapshot of this run becomes the retained base (renamed,
   * so it is not removed with the storage snapshot) and the previous retained snapshot(s) on the image go.
   * Never throws: a failure only costs the next backup a full read (its checks find the base missing); it
   * comes back as a warning for the task's record.
   */
  retain(snapshots: readonly StorageSnapshot[]): Promise<string[]>;
  /** Names this run's storage snapshots, once taken: the diff's other end. */
  useStorageSnapshots(snapshots: readonly StorageSnapshot[]): void;
}

export interface PlanSnapshotDiffInput {
  vmName: string;
  disks: readonly VmDisk[];
  /** The VM's latest restore point: the only one whose retained snapshot may be trusted. */
  latest: RestorePointSummary | undefined;
  /** Session tag: the retained snapshot of this run is named for it. */
  tag: string;
  /** The diffing system that holds a disk, if any. */
  systemFor: (disk: VmDisk) => SnapshotDiffing | undefined;
  full?: boolean;
}

/**
 * Changed-block tracking from the storage system's own snapshot diff (`rbd diff`) for a VM's disks in
 * storage-snapshot mode (docs/CBT.md): one retained snapshot per disk is the base of the next diff, as Benji
 * does. The diff between it and this run's storage snapshot is exact, kept by the storage itself, and survives
 * QEMU restarts (unlike a raw disk's in-memory bitmap). Trusted only if the retained snapshot still exists, the
 * size is unchanged and the restore point that names it is the VM's latest; else the disk is read in full with
 * the reason.
 */
export async function planSnapshotDiffChangedBlocks(input: PlanSnapshotDiffInput): Promise<VmSnapshotDiffPlan> {
  const previous = input.latest ? snapshotDiffRecordOf(input.latest) : undefined;
  const readPlans = new Map<string, DiskReadPlan>();
  const record: SnapshotDiffRecord = { disks: {} };
  const diffingDisks: Array<{ disk: VmDisk; system: SnapshotDiffing; image: string; retainedName: string }> = [];
  let taken: readonly StorageSnapshot[] = [];
  const snapshotNameNow = (system: SnapshotDiffing, imagePath: string): { holder: StorageSnapshot; name: string } | undefined => {
    for (const holder of taken) {
      const name = system.snapshotNameIn(holder, imagePath);
      if (name) return { holder, name };
    }
    return undefined;
  };

  for (const disk of input.disks) {
    const system = input.systemFor(disk);
    const image = system?.diffImageOf(disk.imagePath);
    if (!system || !image) continue;
    const retainedName = system.retainedNameFor(input.tag);
    diffingDisks.push({ disk, system, image, retainedName });
    record.disks[disk.name] = { image, snapshot: retainedName, virtualSizeBytes: disk.virtualSizeBytes };
    const recorded = previous?.disks[disk.name];
    // No record at all (first backup, or the previous one predates the diff): another source may serve.
    if (!input.latest || !recorded) continue;

    let fallbackReason: string | undefined;
    if (recorded.image !== image) fallbackReason = `disk ${disk.name} now uses image ${image}, not ${recorded.image}`;
    else if (recorded.virtualSizeBytes !== disk.virtualSizeBytes) fallbackReason = `disk ${disk.name} was resized from ${recorded.virtualSizeBytes} to ${disk.virtualSizeBytes} bytes`;
    else {
      try {
        if (!(await system.snapshotNames(image)).includes(recorded.snapshot)) {
          fallbackReason = `retained snapshot ${image}@${recorded.snapshot} of disk ${disk.name} is gone (removed by hand?)`;
        }
      } catch (error) {
        fallbackReason = `cannot list the snapshots of ${image}: ${messageOf(error)}`;
      }
    }
    if (!fallbackReason && input.full) fallbackReason = 'a full read was asked for (--full)';
    const source: ChangedBlockSource = {
      kind: 'rbd-diff',
      // Asked at copy time, when this run's storage snapshot exists: the diff's other end.
      async changedRegions(): Promise<Region[]> {
        const now = snapshotNameNow(system, disk.imagePath);
        if (!now) throw new SnapshiftError('RBD_DIFF_FAILED', `${disk.imagePath} is in no storage snapshot of this session: nothing to diff against`);
        return system.changedExtents(image, recorded.snapshot, now.name);
      },
    };
    readPlans.set(disk.name, fallbackReason ? { kind: 'full', fallbackReason } : { kind: 'changed', source });
  }

  return {
    readPlans,
    record,
    retainedLocations: diffingDisks.map(({ image, retainedName }) => `${image}@${retainedName}`),
    useStorageSnapshots(snapshots: readonly StorageSnapshot[]): void {
      taken = snapshots;
    },
    async retain(snapshots: readonly StorageSnapshot[]): Promise<string[]> {
      taken = snapshots;
      const warnings: string[] = [];
      for (const { disk, system, image, retainedName } of diffingDisks) {
        try {
          const now = snapshotNameNow(system, disk.imagePath);
          if (!now) continue;
          await system.retainIn(now.holder, disk.imagePath, retainedName);
          // Older retained snapshots can no longer be a base: only the latest restore point's is trusted.
          for (const name of await system.snapshotNames(image)) {
            if (system.isRetainedName(name) && name !== retainedName) await system.removeSnapshotNamed(image, name);
          }
        } catch (error) {
          warnings.push(`retained snapshot of ${input.vmName} disk ${disk.name} not rotated: ${messageOf(error)}`);
        }
      }
      return warnings;
    },
  };
}

/** The snapshot-diff record of a restore point, if it has a well-formed one. */
export function snapshotDiffRecordOf(restorePoint: RestorePointSummary): SnapshotDiffRecord | undefined {
  return perDiskRecordOf(restorePoint.extra, 'rbdCbt', ({ image, snapshot, virtualSizeBytes }) =>
    typeof image === 'string' && typeof snapshot === 'string' && typeof virtualSizeBytes === 'number' ? { image, snapshot, virtualSizeBytes } : undefined,
  );
}
