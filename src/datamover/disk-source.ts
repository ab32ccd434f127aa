import type { Region } from './extent-map.ts';

export type { Region } from './extent-map.ts';

/** Where the data mover reads one disk from: an NBD export today, anything with reads and a map tomorrow. */
export interface DiskSource {
  readonly sizeBytes: number;
  read(offsetBytes: number, lengthBytes: number): Promise<Buffer>;
  /** The regions that may hold non-zero data, in order; everything else reads as zeros. */
  dataRegions(): Promise<Region[]>;
}
