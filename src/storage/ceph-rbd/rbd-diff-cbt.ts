import { SnapshiftError, messageOf } from '../../core/errors.ts';
import { exec } from '../../core/exec.ts';
import { perDiskRecordOf, type ChangedBlockSource, type DiskReadPlan } from '../../datamover/changed-blocks.ts';
import type { Region } from '../../datamover/extent-map.ts';
import type { VmDisk } from '../../hypervisor/hypervisor.ts';
import type { RestorePointSummary } from '../../repository/index.ts';
import type { StorageSnapshot } from '../storage-system.ts';
import { CephRbdStorage, RbdStorageSnapshot, isRetainedSnapshotName, parseRbdImagePath, rbdImageSpec, retainedPrefix } from './ceph-rbd-storage.ts';

/** What a restore point records per RBD disk: the retained snapshot that is the base of the next `rbd diff`. */
export interface RbdCbtDiskRecord {
  /** `pool/image` (or `pool/namespace/image`). */
  image: string;
  /** The retained RBD snapshot holding this restore point's content, e.g. `snapshift-cbt-<tag>`. */
  snapshot: string;
  virtualSizeBytes: number;
}

/** Stored as `extra.rbdCbt` of a restore point. */
export interface RbdCbtRecord {
  disks: Record<string, RbdCbtDiskRecord>;
}

/** Per RBD disk of one VM task: how it is read, and what the restore point records. */
export interface VmRbdCbtPlan {
  /** Only the RBD disks: `changed` (rbd diff is trusted) or `full` with the reason it is not. */
  readonly readPlans: ReadonlyMap<string, DiskReadPlan>;
  readonly record: RbdCbtRecord;
  /** `pool/image@snapshift-cbt-<tag>` of every RBD disk: what the catalog lists so the hunter keeps them. */
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

export interface PlanRbdCbtInput {
  vmName: string;
  disks: readonly VmDisk[];
  /** The VM's latest restore point: the only one whose retained snapshot may be trusted. */
  latest: RestorePointSummary | undefined;
  /** Session tag: the retained snapshot of this run is `snapshift-cbt-<tag>`. */
  tag: string;
  systemFor: (disk: VmDisk) => CephRbdStorage | undefined;
  full?: boolean;
}

/**
 * Changed-block tracking from `rbd diff` for the RBD disks of a VM in storage-snapshot mode (docs/CBT.md):
 * one retained RBD snapshot per disk is the base of the next diff, as Benji does. The diff between it and
 * this run's storage snapshot is exact, kept by Ceph itself, and survives QEMU restarts (unlike a raw disk's
 * in-memory bitmap). Trusted only if the retained snapshot still exists, the size is unchanged and the
 * restore point that names it is the VM's latest; else the disk is read in full with the reason.
 */
export async function planRbdChangedBlocks(input: PlanRbdCbtInput): Promise<VmRbdCbtPlan> {
  const previous = input.latest ? rbdCbtRecordOf(input.latest) : undefined;
  const retainedName = `${retainedPrefix}${input.tag}`;
  const readPlans = new Map<string, DiskReadPlan>();
  const record: RbdCbtRecord = { disks: {} };
  const rbdDisks: Array<{ disk: VmDisk; system: CephRbdStorage; image: string }> = [];
  let taken: readonly StorageSnapshot[] = [];
  const holderOf = (imagePath: string) => taken.find((snapshot): snapshot is RbdStorageSnapshot => snapshot instanceof RbdStorageSnapshot && snapshot.holds(imagePath));
  const snapshotNow = (imagePath: string): string => {
    const name = holderOf(imagePath)?.snapshotNameOf(imagePath);
    if (!name) throw new SnapshiftError('RBD_DIFF_FAILED', `${imagePath} is in no RBD snapshot of this session: nothing to diff against`);
    return name;
  };

  for (const disk of input.disks) {
    const system = input.systemFor(disk);
    const parsed = parseRbdImagePath(disk.imagePath);
    if (!system || !parsed) continue;
    const image = rbdImageSpec(parsed);
    rbdDisks.push({ disk, system, image });
    record.disks[disk.name] = { image, snapshot: retainedName, virtualSizeBytes: disk.virtualSizeBytes };
    const recorded = previous?.disks[disk.name];
    // No record at all (first backup, or the previous one predates rbd diff): another source may serve.
    if (!input.latest || !recorded) continue;

    let fallbackReason: string | undefined;
    if (recorded.image !== image) fallbackReason = `disk ${disk.name} now uses RBD image ${image}, not ${recorded.image}`;
    else if (recorded.virtualSizeBytes !== disk.virtualSizeBytes) fallbackReason = `disk ${disk.name} was resized from ${recorded.virtualSizeBytes} to ${disk.virtualSizeBytes} bytes`;
    else {
      try {
        if (!(await system.snapshotNames(image)).includes(recorded.snapshot)) {
          fallbackReason = `retained RBD snapshot ${image}@${recorded.snapshot} of disk ${disk.name} is gone (removed by hand?)`;
        }
      } catch (error) {
        fallbackReason = `cannot list the RBD snapshots of ${image}: ${messageOf(error)}`;
      }
    }
    if (!fallbackReason && input.full) fallbackReason = 'a full read was asked for (--full)';
    readPlans.set(disk.name, fallbackReason ? { kind: 'full', fallbackReason } : { kind: 'changed', source: new RbdDiffSource(system, image, recorded.snapshot, disk.imagePath, snapshotNow) });
  }

  return {
    readPlans,
    record,
    retainedLocations: rbdDisks.map(({ image }) => `${image}@${retainedName}`),
    useStorageSnapshots(snapshots: readonly StorageSnapshot[]): void {
      taken = snapshots;
    },
    async retain(snapshots: readonly StorageSnapshot[]): Promise<string[]> {
      taken = snapshots;
      const warnings: string[] = [];
      for (const { disk, system, image } of rbdDisks) {
        try {
          const holder = holderOf(disk.imagePath);
          if (!holder) continue;
          await holder.retain(disk.imagePath, retainedName);
          // Older retained snapshots can no longer be a base: only the latest restore point's is trusted.
          for (const name of await system.snapshotNames(image)) {
            if (isRetainedSnapshotName(name) && name !== retainedName) await system.removeSnapshotNamed(image, name);
          }
        } catch (error) {
          warnings.push(`retained RBD snapshot of ${input.vmName} disk ${disk.name} not rotated: ${messageOf(error)}`);
        }
      }
      return warnings;
    },
  };
}

/** The rbd-diff record of a restore point, if it has a well-formed one. */
export function rbdCbtRecordOf(restorePoint: RestorePointSummary): RbdCbtRecord | undefined {
  return perDiskRecordOf(restorePoint.extra, 'rbdCbt', ({ image, snapshot, virtualSizeBytes }) =>
    typeof image === 'string' && typeof snapshot === 'string' && typeof virtualSizeBytes === 'number' ? { image, snapshot, virtualSizeBytes } : undefined,
  );
}

/**
 * `rbd diff --from-snap <retained> pool/image@<this run's snapshot> --format json`: the exact extents written
 * between the two snapshots (discarded ones too: they must read as zeros now). Asked at copy time, when this
 * run's storage snapshot exists.
 */
class RbdDiffSource implements ChangedBlockSource {
  readonly kind = 'rbd-diff' as const;
  constructor(
    private readonly system: CephRbdStorage,
    private readonly image: string,
    private readonly fromSnapshot: string,
    private readonly imagePath: string,
    private readonly snapshotNow: (imagePath: string) => string,
  ) {}

  async changedRegions(): Promise<Region[]> {
    const to = this.snapshotNow(this.imagePath);
    const { stdout } = await exec('rbd', ['-c', this.system.confPath, 'diff', '--from-snap', this.fromSnapshot, `${this.image}@${to}`, '--format', 'json'], {
      code: 'RBD_DIFF_FAILED',
      timeoutMs: 600_000,
    });
    const extents = JSON.parse(stdout) as Array<{ offset: number; length: number }>;
    return extents.map(({ offset, length }) => ({ offset, length })).sort((a, b) => a.offset - b.offset);
  }
}
