import { SnapshiftError } from '../core/errors.ts';
import type { ExportExtent, ExportPiece, NbdExportSource } from '../datamover/nbd/index.ts';
import type { RestorePointReader } from '../repository/index.ts';

export interface RestorePointExportOptions {
  /** Decoded chunks kept in memory, in bytes (default 64 MiB; at least 4 chunks). */
  cacheBytes?: number;
  /** Chunks decoded ahead of a sequential reader (default 8). */
  readAheadChunks?: number;
  /** Hears non-fatal problems, e.g. a read-only repository served without a lock. */
  onWarning?: (message: string) => void;
  /** Who holds the lock, as `gc` and `check` will name it (default "serving VM disk D"). */
  lockPurpose?: string;
}

const defaultCacheBytes = 64 * 1024 * 1024;
const defaultReadAheadChunks = 8;
/** A block status answer looks at most this many chunks (a client asks again for the rest). */
const maxExtentChunks = 1 << 20;

/**
 * One disk of a restore point as an NBD export source: chunks are read through the repository and decoded
 * by its blob workers, zero chunks are holes, a sequential reader gets the next chunks decoded ahead, and a
 * bounded cache keeps what parallel requests share. It holds the repository's shared lock from `open` until
 * disposed, so gc cannot delete packs it serves.
 */
export class RestorePointExport implements NbdExportSource, AsyncDisposable {
  readonly name: string;
  readonly description: string;
  readonly sizeBytes: number;
  readonly preferredBlockBytes: number;
  readonly #reader: RestorePointReader;
  readonly #chunkSizeBytes: number;
  readonly #chunkCount: number;
  readonly #cacheChunks: number;
  readonly #readAheadChunks: number;
  /** Chunk index -> its decode (in flight or done), least recently used first. */
  readonly #cache = new Map<number, Promise<Buffer>>();
  #lastChunkRead = -1;
  #lock: { release(): Promise<void> } | undefined;
  #closed = false;
  /** Chunks decoded (cache misses), for tests and stats. */
  chunksDecoded = 0;

  private constructor(reader: RestorePointReader, diskName: string, options: RestorePointExportOptions) {
    const disk = reader.summary.disks.find((candidate) => candidate.name === diskName);
    if (!disk) {
      throw new SnapshiftError('RESTORE_NO_SUCH_DISK', `restore point ${reader.summary.id} has no disk "${diskName}" (it has: ${reader.summary.disks.map((d) => d.name).join(', ')})`);
    }
    this.#reader = reader;
    this.name = diskName;
    this.sizeBytes = disk.sizeBytes;
    this.description = `${reader.summary.vmName} disk ${diskName} at restore point ${reader.summary.id} (${reader.summary.createdAt})`;
    this.#chunkSizeBytes = reader.repository.chunkSizeBytes;
    this.preferredBlockBytes = this.#chunkSizeBytes;
    this.#chunkCount = reader.chunkCountOf(diskName);
    this.#cacheChunks = Math.max(4, Math.floor((options.cacheBytes ?? defaultCacheBytes) / this.#chunkSizeBytes));
    this.#readAheadChunks = Math.max(0, Math.min(options.readAheadChunks ?? defaultReadAheadChunks, this.#cacheChunks - 2));
  }

  /** Takes the shared repository lock, then checks the restore point still exists (it may have been forgotten in between). */
  static async open(reader: RestorePointReader, diskName: string, options: RestorePointExportOptions = {}): Promise<RestorePointExport> {
    const source = new RestorePointExport(reader, diskName, options);
    const repository = reader.repository;
    source.#lock = await repository.lockForReading(options.lockPurpose ?? `serving ${reader.summary.vmName} disk ${diskName}`, options.onWarning);
    try {
      if (!(await repository.hasRestorePoint(reader.summary.id))) {
        throw new SnapshiftError('REPO_RESTORE_POINT_NOT_FOUND', `restore point ${reader.summary.id} was forgotten while it was being opened; nothing is served`);
      }
    } catch (error) {
      await source.close();
      throw error;
    }
    return source;
  }

  async read(offsetBytes: number, lengthBytes: number, signal?: AbortSignal): Promise<ExportPiece[]> {
    this.#checkOpen();
    this.#checkRange(offsetBytes, lengthBytes);
    const end = offsetBytes + lengthBytes;
    const first = Math.floor(offsetBytes / this.#chunkSizeBytes);
    const last = lengthBytes === 0 ? first - 1 : Math.floor((end - 1) / this.#chunkSizeBytes);
    // Sequential: this read starts where the last one ended, or (parallel readers such as qemu-img's
    // coroutines arrive out of order) the chunk before it was read recently.
    const sequential = first === 0 || this.#lastChunkRead === first - 1 || this.#lastChunkRead === first || this.#cache.has(first - 1);
    this.#lastChunkRead = last;
    const decodes: Array<Promise<Buffer> | undefined> = [];
    for (let index = first; index <= last; index++) decodes.push(this.#isZero(index) ? undefined : this.#chunk(index));
    if (sequential) {
      // The next data chunks (zero chunks cost nothing and do not count), looking at most 64 chunks past the window.
      const scanEnd = Math.min(this.#chunkCount, last + 1 + this.#readAheadChunks + 64);
      for (let index = last + 1, queued = 0; index < scanEnd && queued < this.#readAheadChunks; index++) {
        if (this.#isZero(index)) continue;
        queued++;
        if (!this.#cache.has(index)) void this.#chunk(index).catch(() => undefined);
      }
    }
    const pieces: ExportPiece[] = [];
    for (let index = first; index <= last; index++) {
      const chunkStart = index * this.#chunkSizeBytes;
      const from = Math.max(offsetBytes, chunkStart);
      const to = Math.min(end, chunkStart + this.#chunkSizeBytes);
      const decode = decodes[index - first];
      if (!decode) {
        const previous = pieces.at(-1);
        if (previous && !previous.data) previous.lengthBytes += to - from;
        else pieces.push({ lengthBytes: to - from });
        continue;
      }
      const data = await decode;
      if (signal?.aborted) throw new SnapshiftError('RESTORE_STOPPED', `read of ${this.name} stopped: ${String(signal.reason)}`);
      if (data.length < to - chunkStart) {
        throw new SnapshiftError('REPO_CHUNK_DAMAGED', `chunk ${index} of disk ${this.name} decodes to ${data.length} bytes; the disk needs ${to - chunkStart} there`);
      }
      pieces.push({ lengthBytes: to - from, data: data.subarray(from - chunkStart, to - chunkStart) });
    }
    return pieces;
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<ExportExtent[]> {
    this.#checkOpen();
    this.#checkRange(offsetBytes, lengthBytes);
    const end = offsetBytes + lengthBytes;
    const extents: ExportExtent[] = [];
    let at = offsetBytes;
    for (let looked = 0; at < end && looked < maxExtentChunks; looked++) {
      const index = Math.floor(at / this.#chunkSizeBytes);
      const to = Math.min(end, (index + 1) * this.#chunkSizeBytes);
      const zero = this.#isZero(index);
      const previous = extents.at(-1);
      if (previous && previous.zero === zero) previous.lengthBytes += to - at;
      else extents.push({ lengthBytes: to - at, zero });
      at = to;
    }
    return extents;
  }

  /** True when the chunk holding byte `offsetBytes` is a zero chunk (stored nowhere, reads as zeros). */
  isZeroAt(offsetBytes: number): boolean {
    this.#checkRange(offsetBytes, 1);
    return this.#isZero(Math.floor(offsetBytes / this.#chunkSizeBytes));
  }

  /** Releases the repository lock; reads after this fail. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#cache.clear();
    const lock = this.#lock;
    this.#lock = undefined;
    await lock?.release();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  #isZero(index: number): boolean {
    return this.#reader.chunkIsZero(this.name, index);
  }

  #chunk(index: number): Promise<Buffer> {
    const cached = this.#cache.get(index);
    if (cached) {
      this.#cache.delete(index);
      this.#cache.set(index, cached);
      return cached;
    }
    this.chunksDecoded++;
    const decode = this.#reader.readChunkAt(this.name, index);
    this.#cache.set(index, decode);
    decode.catch(() => {
      if (this.#cache.get(index) === decode) this.#cache.delete(index);
    });
    while (this.#cache.size > this.#cacheChunks) this.#cache.delete(this.#cache.keys().next().value!);
    return decode;
  }

  #checkOpen(): void {
    if (this.#closed) throw new SnapshiftError('RESTORE_STOPPED', `the export of ${this.name} is closed`);
  }

  #checkRange(offsetBytes: number, lengthBytes: number): void {
    if (!Number.isSafeInteger(offsetBytes) || !Number.isSafeInteger(lengthBytes) || offsetBytes < 0 || lengthBytes < 0 || offsetBytes + lengthBytes > this.sizeBytes) {
      throw new SnapshiftError('BAD_ARGUMENT', `range ${offsetBytes}+${lengthBytes} is outside disk ${this.name} (${this.sizeBytes} bytes)`);
    }
  }
}
