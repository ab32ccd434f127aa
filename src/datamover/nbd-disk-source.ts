import { NbdClient } from './nbd/index.ts';
import type { DiskSource } from './disk-source.ts';
import { collectRegions, type Region } from './extent-map.ts';

const allocationContext = 'base:allocation';

/** A disk read over NBD with our client; the allocation map comes from `base:allocation` block status. */
export class NbdDiskSource implements DiskSource, AsyncDisposable {
  private constructor(private readonly nbd: NbdClient) {}

  static async open(socketPath: string, exportName: string): Promise<NbdDiskSource> {
    const nbd = await NbdClient.connect({ socketPath, exportName, metaContexts: [allocationContext] });
    return new NbdDiskSource(nbd);
  }

  /**
   * Opens an export for the dirty bitmap `bitmapName` only (the export must carry it: block-export-add
   * bitmaps=[...]); `dirtyRegions()` then lists what it marks.
   */
  static async openBitmap(socketPath: string, exportName: string, bitmapName: string): Promise<NbdDiskSource> {
    const nbd = await NbdClient.connect({ socketPath, exportName, metaContexts: [dirtyBitmapContext(bitmapName)] });
    return new NbdDiskSource(nbd);
  }

  get sizeBytes(): number {
    return this.nbd.sizeBytes;
  }

  read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    // Don't-fragment: qemu 7.2 answers a failed read with an error reply (EIO) only then; a fragmented
    // read that fails drops the connection, and the user would read "disconnected" instead of the cause.
    return this.nbd.read(offsetBytes, lengthBytes, { dontFragment: true });
  }

  async dataRegions(): Promise<Region[]> {
    if (!this.nbd.metaContexts.has(allocationContext)) return [{ offset: 0, length: this.sizeBytes }];
    return collectRegions(this.nbd.extents(allocationContext), 'data');
  }

  /** Regions the dirty bitmap `bitmapName` marks changed (NBD meta context `qemu:dirty-bitmap:NAME`). */
  async dirtyRegions(bitmapName: string): Promise<Region[]> {
    return collectRegions(this.nbd.extents(dirtyBitmapContext(bitmapName)), 'dirty');
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.nbd.close();
  }
}

function dirtyBitmapContext(bitmapName: string): string {
  return `qemu:dirty-bitmap:${bitmapName}`;
}
