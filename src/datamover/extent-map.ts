import { SnapshiftError } from '../core/errors.ts';
import { allocationFlag, dirtyFlag } from './nbd/nbd-protocol.ts';
import type { Extent } from './nbd/nbd-reply-parser.ts';

/** A byte range of a disk. */
export interface Region {
  offset: number;
  length: number;
}

/**
 * Regions that must be read, from `base:allocation` extents: all but those known to read as zeros
 * (NBD spec, "base:allocation": NBD_STATE_ZERO = 2 promises zeros; NBD_STATE_HOLE = 1 alone only says
 * "unallocated" and its bytes may be anything, so such a hole is read). Neighbours merge.
 */
export function dataRegions(allocationExtents: Iterable<Extent>): Region[] {
  return selectRegions(allocationExtents, isData);
}

/** Regions a dirty bitmap marks changed, from `qemu:dirty-bitmap:NAME` extents (flag 1 = dirty). */
export function dirtyRegions(bitmapExtents: Iterable<Extent>): Region[] {
  return selectRegions(bitmapExtents, (flags) => (flags & dirtyFlag) !== 0);
}

/** Async form of `dataRegions`/`dirtyRegions` for `NbdClient.extents()`, without holding all extents. */
export async function collectRegions(extents: AsyncIterable<Extent>, kind: 'data' | 'dirty'): Promise<Region[]> {
  const keep = kind === 'data' ? isData : (flags: number) => (flags & dirtyFlag) !== 0;
  const regions: Region[] = [];
  for await (const extent of extents) if (keep(extent.flags)) appendMerged(regions, extent.offset, extent.length);
  return regions;
}

/**
 * Rounds each region out to `chunkBytes` boundaries (the repository's fixed chunks) and merges regions
 * that then touch or overlap, clipped to `sizeBytes` (the last chunk of a disk may be short).
 * Input must be sorted by offset, as block status gives it.
 */
export function alignRegions(regions: Iterable<Region>, chunkBytes: number, sizeBytes: number): Region[] {
  if (!Number.isSafeInteger(chunkBytes) || chunkBytes <= 0) throw new SnapshiftError('BAD_ARGUMENT', `chunk size must be a positive integer, not ${chunkBytes}`);
  const aligned: Region[] = [];
  for (const region of regions) {
    if (region.length <= 0) continue;
    const start = Math.floor(region.offset / chunkBytes) * chunkBytes;
    const end = Math.min(sizeBytes, Math.ceil((region.offset + region.length) / chunkBytes) * chunkBytes);
    const last = aligned.at(-1);
    if (last && start < last.offset) throw new SnapshiftError('BAD_ARGUMENT', 'regions must be sorted by offset');
    if (last && start <= last.offset + last.length) last.length = Math.max(last.length, end - last.offset);
    else aligned.push({ offset: start, length: end - start });
  }
  return aligned;
}

/** Total bytes of `regions`. */
export function regionBytes(regions: Iterable<Region>): number {
  let total = 0;
  for (const region of regions) total += region.length;
  return total;
}

function isData(flags: number): boolean {
  return (flags & allocationFlag.zero) === 0;
}

function selectRegions(extents: Iterable<Extent>, keep: (flags: number) => boolean): Region[] {
  const regions: Region[] = [];
  for (const extent of extents) if (keep(extent.flags)) appendMerged(regions, extent.offset, extent.length);
  return regions;
}

function appendMerged(regions: Region[], offset: number, length: number): void {
  if (length <= 0) return;
  const last = regions.at(-1);
  if (last && last.offset + last.length === offset) last.length += length;
  else regions.push({ offset, length });
}
