import { NbdClient } from './nbd/index.ts';
import type { DiskSource, Region } from './disk-source.ts';

const allocationContext = 'base:allocation';
// NBD spec, "base:allocation" metadata context: bit 0 = hole, bit 1 = reads as zeros. Only the zero bit
// lets us skip a region: a hole without it may still read as data (e.g. from a backing file).
const stateZero = 2;

/** A disk read over NBD with our client; the allocation map comes from `base:allocation` block status. */
export class NbdDiskSource implements DiskSource, AsyncDisposable {
  private constructor(private readonly nbd: NbdClient) {}

  static async open(socketPath: string, exportName: string): Promise<NbdDiskSource> {
    const nbd = await NbdClient.connect({ socketPath, exportName, metaContexts: [allocationContext] });
    return new NbdDiskSource(nbd);
  }

  get sizeBytes(): number {
    return this.nbd.sizeBytes;
  }

  read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    return this.nbd.read(offsetBytes, lengthBytes);
  }

  async dataRegions(): Promise<Region[]> {
    if (!this.nbd.metaContexts.has(allocationContext)) return [{ offset: 0, length: this.sizeBytes }];
    const regions: Region[] = [];
    for await (const extent of this.nbd.extents(allocationContext)) {
      if ((extent.flags & stateZero) !== 0) continue;
      const last = regions.at(-1);
      if (last && last.offset + last.length === extent.offset) last.length += extent.length;
      else regions.push({ offset: extent.offset, length: extent.length });
    }
    return regions;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.nbd.close();
  }
}
