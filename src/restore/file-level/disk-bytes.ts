import type { NbdExportSource } from '../../datamover/nbd/index.ts';

/** Reads bytes of a disk at an offset; the partition table and superblock probes need nothing more. */
export type ReadDiskBytes = (offsetBytes: number, lengthBytes: number) => Promise<Buffer>;

/**
 * `read` of an export source as one buffer (holes as zeros), clipped to the disk's end. Partition tables
 * and superblocks are read from the export in-process, not through the FUSE file: see docs/NOTES.md
 * § File-level restore (our own NBD server must never wait on a read of its own mount).
 */
export function diskBytesOf(source: NbdExportSource, signal: AbortSignal = new AbortController().signal): ReadDiskBytes {
  return async (offsetBytes, lengthBytes) => {
    const end = Math.min(source.sizeBytes, offsetBytes + lengthBytes);
    const bytes = Buffer.alloc(lengthBytes);
    if (offsetBytes >= end) return bytes;
    let at = 0;
    for (const piece of await source.read(offsetBytes, end - offsetBytes, signal)) {
      piece.data?.copy(bytes, at);
      at += piece.lengthBytes;
    }
    return bytes;
  };
}
