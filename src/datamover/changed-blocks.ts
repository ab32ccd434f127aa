import type { Region } from './extent-map.ts';

/** Where a disk's changed extents come from: a QEMU dirty bitmap, a Ceph `rbd diff`, or nothing (full read). */
export type CbtSourceKind = 'bitmap' | 'rbd-diff' | 'none';

/**
 * Changed-block tracking for one disk: the byte ranges written since the base restore point. A backup
 * reads only these (rounded out to chunks) and inherits every other chunk from the base restore point.
 */
export interface ChangedBlockSource {
  readonly kind: Exclude<CbtSourceKind, 'none'>;
  /** Changed ranges, sorted by offset, not necessarily chunk-aligned. */
  changedRegions(): Promise<Region[]>;
}

/** How one disk is read: only its changed regions, or all of it (with the reason CBT could not be used). */
export type DiskReadPlan = { kind: 'changed'; source: ChangedBlockSource } | { kind: 'full'; fallbackReason?: string };

/** What a task reports per disk about changed-block tracking. */
export interface DiskCbtStats {
  cbtSource: CbtSourceKind;
  /** Bytes CBT reported changed (before rounding to chunks); null on a full read. */
  dirtyBytes: number | null;
  /** Why the disk was read in full although a previous restore point exists. */
  fallbackReason: string | null;
}

/**
 * The per-disk record a CBT source keeps in a restore point's manifest (`extra[key].disks[name]`), with only
 * the entries `parse` accepts: a manifest is read from disk, so its shape is checked, never trusted.
 */
export function perDiskRecordOf<T>(extra: Record<string, unknown>, key: string, parse: (entry: Record<string, unknown>) => T | undefined): { disks: Record<string, T> } | undefined {
  const value = extra[key] as { disks?: unknown } | undefined;
  if (!value || typeof value !== 'object' || !value.disks || typeof value.disks !== 'object') return undefined;
  const disks: Record<string, T> = {};
  for (const [name, entry] of Object.entries(value.disks as Record<string, unknown>)) {
    const parsed = entry && typeof entry === 'object' ? parse(entry as Record<string, unknown>) : undefined;
    if (parsed !== undefined) disks[name] = parsed;
  }
  return { disks };
}
