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
