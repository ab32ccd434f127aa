import { messageOf } from '../../core/errors.ts';
import { perDiskRecordOf, type ChangedBlockSource, type DiskReadPlan } from '../../datamover/changed-blocks.ts';
import type { Region } from '../../datamover/extent-map.ts';
import { NbdDiskSource } from '../../datamover/nbd-disk-source.ts';
import type { CbtPlanInput, DiskExport, VmCbtPlan, VmDisk } from '../hypervisor.ts';
import { bitmapNameFor, bitmapOwnerOf, listDirtyBitmaps, removeDirtyBitmap, revertBitmapRotation, type BitmapRotation } from './dirty-bitmaps.ts';
import type { QmpSession } from './qmp-session.ts';

/** What a restore point records per disk so the next backup can trust (or distrust) its bitmap. */
export interface CbtDiskRecord {
  /** The bitmap that records writes since this restore point. */
  bitmap: string;
  virtualSizeBytes: number;
  imagePath: string;
}

/** Stored as `extra.cbt` of a restore point. */
export interface CbtRecord {
  disks: Record<string, CbtDiskRecord>;
}

/** Exports a node of the live VM read-only with `bitmap` attached, to read its block status. */
export type BitmapExporter = (disk: VmDisk, index: number, bitmap: string) => Promise<DiskExport>;

/** A QEMU CBT plan: besides what every plan says, the bitmap changes for the VM snapshot's transaction. */
export interface QemuCbtPlan extends VmCbtPlan {
  readonly kind: 'qemu-bitmaps';
  readonly rotations: readonly BitmapRotation[];
}

export function isQemuCbtPlan(plan: VmCbtPlan | undefined): plan is QemuCbtPlan {
  return (plan as QemuCbtPlan | undefined)?.kind === 'qemu-bitmaps';
}

/**
 * Plans CBT for a VM. Must run before the VM snapshot (its rotations go into that transaction) and before
 * the repository writer starts (it names the base restore point). This repository's bitmaps that its
 * latest restore point cannot use (left by interrupted tasks, inconsistent, stopped), and bitmaps named by
 * earlier versions that it does not adopt, are removed here; other repositories' bitmaps are never touched.
 */
export async function planQemuChangedBlocks(qmp: QmpSession, vmName: string, disks: readonly VmDisk[], input: CbtPlanInput & { exportWithBitmap: BitmapExporter }): Promise<QemuCbtPlan> {
  const latest = input.latest;
  const previous = latest ? cbtRecordOf(latest) : undefined;
  const chainKey = input.chainKey;
  const newBitmap = bitmapNameFor(chainKey, input.tag);
  // Earlier versions named bitmaps without a repository: this repository adopts the one its latest restore
  // point names, and removes the others (docs/CBT.md, "Bitmaps named by earlier versions").
  const isOwnBitmap = (name: string): boolean => {
    const owner = bitmapOwnerOf(name);
    return owner.kind === 'legacy' || (owner.kind === 'chain' && owner.chainKey === chainKey);
  };
  const rotations: BitmapRotation[] = [];
  const readPlans = new Map<string, DiskReadPlan>();
  const record: CbtRecord = { disks: {} };

  for (const [index, disk] of disks.entries()) {
    const recorded = previous?.disks[disk.name];
    const recordedHere = recorded !== undefined && isOwnBitmap(recorded.bitmap);
    const bitmaps = await listDirtyBitmaps(qmp, disk.nodeName);
    const existing = recordedHere ? bitmaps.find((bitmap) => bitmap.name === recorded.bitmap) : undefined;
    // The previous restore point's bitmap can be frozen (and later dropped or restored) if it is sound.
    const freezable = existing !== undefined && !existing.inconsistent && existing.recording && !existing.busy;
    for (const bitmap of bitmaps) {
      // A busy bitmap is in use (exported by a live task): QEMU refuses to remove it, and a later backup will.
      if (isOwnBitmap(bitmap.name) && !bitmap.busy && !(freezable && bitmap.name === existing.name)) await removeDirtyBitmap(qmp, disk.nodeName, bitmap.name);
    }

    let fallbackReason: string | undefined;
    if (!latest) fallbackReason = undefined; // the first backup of the VM: a full read, nothing to explain
    else if (!recorded) fallbackReason = `the previous restore point ${latest.id.slice(0, 12)} has no changed-block record for disk ${disk.name}`;
    else if (!recordedHere) fallbackReason = `dirty bitmap ${recorded.bitmap} of disk ${disk.name} belongs to another repository's chain (was restore point ${latest.id.slice(0, 12)} copied from another repository?)`;
    else if (!existing) fallbackReason = `dirty bitmap ${recorded.bitmap} is gone from disk ${disk.name} (QEMU restarted with a raw disk, or it was removed by hand)`;
    else if (existing.inconsistent) fallbackReason = `dirty bitmap ${recorded.bitmap} of disk ${disk.name} is inconsistent (QEMU was not shut down cleanly)`;
    else if (!existing.recording) fallbackReason = `dirty bitmap ${recorded.bitmap} of disk ${disk.name} had stopped recording (an earlier backup was interrupted)`;
    else if (existing.busy) fallbackReason = `dirty bitmap ${recorded.bitmap} of disk ${disk.name} is in use by another job`;
    else if (recorded.virtualSizeBytes !== disk.virtualSizeBytes) fallbackReason = `disk ${disk.name} was resized from ${recorded.virtualSizeBytes} to ${disk.virtualSizeBytes} bytes`;
    else if (recorded.imagePath !== disk.imagePath) fallbackReason = `disk ${disk.name} now uses image ${disk.imagePath}, not ${recorded.imagePath}`;
    else if (input.full) fallbackReason = 'a full read was asked for (--full)';

    const usable = latest !== undefined && recorded !== undefined && freezable && fallbackReason === undefined;
    readPlans.set(disk.name, usable ? { kind: 'changed', source: new QemuBitmapSource(disk, index, recorded.bitmap, input.exportWithBitmap) } : { kind: 'full', fallbackReason });
    // Raw images cannot store bitmaps: theirs live in QEMU's memory only, lost (and then detected) on restart.
    rotations.push({ nodeName: disk.nodeName, freeze: freezable ? existing.name : undefined, start: { name: newBitmap, persistent: disk.format === 'qcow2' } });
    record.disks[disk.name] = { bitmap: newBitmap, virtualSizeBytes: disk.virtualSizeBytes, imagePath: disk.imagePath };
  }

  let finished = false;
  return {
    kind: 'qemu-bitmaps',
    baseRestorePointId: latest?.id,
    rotations,
    readPlans,
    record,
    async finish(succeeded: boolean): Promise<string[]> {
      if (finished) return [];
      finished = true;
      const failures: unknown[] = [];
      for (const rotation of rotations) {
        try {
          // Only what the transaction really did is undone or dropped: it may never have run.
          const names = new Set((await listDirtyBitmaps(qmp, rotation.nodeName)).map((bitmap) => bitmap.name));
          if (!names.has(rotation.start.name)) continue;
          if (succeeded) {
            if (rotation.freeze && names.has(rotation.freeze)) await removeDirtyBitmap(qmp, rotation.nodeName, rotation.freeze);
          } else {
            await revertBitmapRotation(qmp, { ...rotation, freeze: rotation.freeze && names.has(rotation.freeze) ? rotation.freeze : undefined });
          }
        } catch (error) {
          failures.push(error);
        }
      }
      // Not fatal to the restore point: a bitmap left behind is found and removed by the next backup, whose
      // checks then choose a full read for that disk.
      return failures.length > 0 ? [`dirty bitmaps of ${vmName} not cleaned up: ${messageOf(failures[0])}`] : [];
    },
  };
}

/** The CBT record of a restore point, if it has a well-formed one. */
export function cbtRecordOf(restorePoint: { extra: Record<string, unknown> }): CbtRecord | undefined {
  return perDiskRecordOf(restorePoint.extra, 'cbt', ({ bitmap, virtualSizeBytes, imagePath }) =>
    typeof bitmap === 'string' && typeof virtualSizeBytes === 'number' && typeof imagePath === 'string' ? { bitmap, virtualSizeBytes, imagePath } : undefined,
  );
}

/**
 * The frozen bitmap of one disk, read as block status through a read-only export of the live VM's node.
 * QEMU refuses an enabled bitmap on a read-only export; the frozen one is disabled. In storage-snapshot
 * mode the data comes from the storage snapshot, but the bitmap lives only in the VM: hence its own export.
 */
class QemuBitmapSource implements ChangedBlockSource {
  readonly kind = 'bitmap' as const;
  constructor(
    private readonly disk: VmDisk,
    private readonly index: number,
    private readonly bitmap: string,
    private readonly exportWithBitmap: BitmapExporter,
  ) {}

  async changedRegions(): Promise<Region[]> {
    await using diskExport = await this.exportWithBitmap(this.disk, this.index, this.bitmap);
    await using source = await NbdDiskSource.openBitmap(diskExport.socketPath, diskExport.exportName, this.bitmap);
    return await source.dirtyRegions(this.bitmap); // awaited here, before the export is disposed
  }
}
