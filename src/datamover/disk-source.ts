/** A byte range of a disk. */
export interface Region {
  offset: number;
  length: number;
}

/** Where the data mover reads one disk from: an NBD export today, anything with reads and a map tomorrow. */
export interface DiskSource {
  readonly sizeBytes: number;
  read(offsetBytes: number, lengthBytes: number): Promise<Buffer>;
  /** The regions that may hold non-zero data, in order; everything else reads as zeros. */
  dataRegions(): Promise<Region[]>;
}

/** Rounds regions out to `chunkBytes` boundaries and merges neighbours, clipped to the disk size. */
export function roundToChunks(regions: readonly Region[], chunkBytes: number, sizeBytes: number): Region[] {
  const rounded: Region[] = [];
  for (const region of regions) {
    if (region.length <= 0) continue;
    const start = Math.floor(region.offset / chunkBytes) * chunkBytes;
    const end = Math.min(sizeBytes, Math.ceil((region.offset + region.length) / chunkBytes) * chunkBytes);
    const last = rounded.at(-1);
    if (last && start <= last.offset + last.length) last.length = Math.max(last.length, end - last.offset);
    else rounded.push({ offset: start, length: end - start });
  }
  return rounded;
}
