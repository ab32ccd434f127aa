import type { DiskCbtStats, DiskReadPlan } from '../datamover/changed-blocks.ts';
import type { DiskCopyStats } from '../datamover/disk-copier.ts';
import { regionBytes } from '../datamover/extent-map.ts';
import { copyDisk } from '../datamover/disk-copier.ts';
import { NbdDiskSource } from '../datamover/nbd-disk-source.ts';
import { SnapshiftError } from '../core/errors.ts';
import { faultPoint } from '../core/fault-points.ts';
import type { DiskExport, VmDisk } from '../hypervisor/hypervisor.ts';
import type { BackupWriter } from '../repository/index.ts';

export interface VmCopyOptions {
  chunkSizeBytes: number;
  readAhead?: number;
  maxReadBytesPerSecond?: number;
  signal?: AbortSignal;
  onProgress?: (processedBytes: number) => void;
  /** Per disk name: read only what changed (CBT) or all of it; default all. */
  readPlans?: ReadonlyMap<string, DiskReadPlan>;
}

export interface VmDiskCopy {
  name: string;
  stats: DiskCopyStats;
  cbt: DiskCbtStats;
}

/**
 * Copies every disk of a VM into the restore point being written, each through the export `exportFor`
 * opens (the VM's own NBD server, or a daemon reading a storage snapshot). Disks go one after another so
 * memory stays bounded by one disk's read window. A disk with changed-block tracking is read only where it
 * changed; its dirty extents are listed before its data export opens.
 */
export async function copyVmDisks(
  writer: BackupWriter,
  disks: readonly VmDisk[],
  exportFor: (disk: VmDisk, index: number) => Promise<DiskExport>,
  options: VmCopyOptions,
): Promise<VmDiskCopy[]> {
  const copies: VmDiskCopy[] = [];
  let doneBefore = 0;
  for (const [index, disk] of disks.entries()) {
    const plan = options.readPlans?.get(disk.name) ?? { kind: 'full' };
    const changedRegions = plan.kind === 'changed' ? await plan.source.changedRegions() : undefined;
    await using diskExport = await exportFor(disk, index);
    faultPoint('copy.export-added');
    await using source = await NbdDiskSource.open(diskExport.socketPath, diskExport.exportName);
    if (source.sizeBytes !== disk.virtualSizeBytes) {
      throw new SnapshiftError('DISK_SIZE_MISMATCH', `disk ${disk.name}: the export is ${source.sizeBytes} bytes, QEMU says ${disk.virtualSizeBytes}`);
    }
    const stats = await copyDisk(source, writer.addDisk(disk.name, disk.virtualSizeBytes), {
      chunkSizeBytes: options.chunkSizeBytes,
      readAhead: options.readAhead,
      maxReadBytesPerSecond: options.maxReadBytesPerSecond,
      signal: options.signal,
      onProgress: (processed) => {
        faultPoint('copy.mid-copy');
        options.onProgress?.(doneBefore + processed);
      },
      changedRegions,
    });
    doneBefore += disk.virtualSizeBytes;
    const cbt: DiskCbtStats =
      plan.kind === 'changed'
        ? { cbtSource: plan.source.kind, dirtyBytes: regionBytes(changedRegions!), fallbackReason: null }
        : { cbtSource: 'none', dirtyBytes: null, fallbackReason: plan.fallbackReason ?? null };
    copies.push({ name: disk.name, stats, cbt });
  }
  return copies;
}
