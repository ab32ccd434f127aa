import { SnapshiftError } from '../core/errors.ts';
import type { Repository } from './repository.ts';
import { readManifest, summaryOf, zeroId, type ManifestHeader, type RestorePointSummary } from './manifest.ts';

/** Chunks decoded at once by one read, and kept ahead of a sequential reader. */
const readAheadChunks = 6;
const cachedChunks = 16;

/** Reads any byte range of any disk of one restore point. */
export class RestorePointReader {
  readonly summary: RestorePointSummary;
  readonly #maps = new Map<string, { sizeBytes: number; map: Buffer }>();
  readonly #cache = new Map<string, Promise<Buffer>>();
  #lastChunk = new Map<string, number>();

  private constructor(
    readonly repository: Repository,
    readonly header: ManifestHeader,
    maps: Buffer[],
  ) {
    this.summary = summaryOf(header);
    header.disks.forEach((disk, i) => this.#maps.set(disk.name, { sizeBytes: disk.sizeBytes, map: maps[i]! }));
  }

  static async open(repository: Repository, id: string): Promise<RestorePointReader> {
    const { header, maps } = await readManifest(repository.backend, repository.keys, id);
    if (header.chunkSizeBytes !== repository.chunkSizeBytes) {
      throw new SnapshiftError('REPO_FILE_DAMAGED', `manifest of restore point ${id} has chunk size ${header.chunkSizeBytes}, the repository ${repository.chunkSizeBytes}`);
    }
    return new RestorePointReader(repository, header, maps);
  }

  /** internal: the chunk map of a disk (32 bytes per chunk), or undefined if the disk is not in this point. */
  mapOf(diskName: string): Buffer | undefined {
    return this.#maps.get(diskName)?.map;
  }

  chunkIsZero(diskName: string, chunkIndex: number): boolean {
    const map = this.#disk(diskName).map;
    if (chunkIndex < 0 || (chunkIndex + 1) * 32 > map.length) throw new SnapshiftError('BAD_ARGUMENT', `disk ${diskName} has no chunk ${chunkIndex}`);
    return map.compare(zeroId, 0, 32, chunkIndex * 32, chunkIndex * 32 + 32) === 0;
  }

  /** Number of chunks of a disk (the last may be short). */
  chunkCountOf(diskName: string): number {
    return this.#disk(diskName).map.length / 32;
  }

  /** Decodes one chunk of a disk, uncached (a zero chunk is stored nowhere: check `chunkIsZero` first). */
  readChunkAt(diskName: string, chunkIndex: number): Promise<Buffer> {
    const map = this.#disk(diskName).map;
    if (chunkIndex < 0 || (chunkIndex + 1) * 32 > map.length) throw new SnapshiftError('BAD_ARGUMENT', `disk ${diskName} has no chunk ${chunkIndex}`);
    return readChunk(this.repository, map.subarray(chunkIndex * 32, chunkIndex * 32 + 32), `disk ${diskName} offset ${chunkIndex * this.repository.chunkSizeBytes}`, false);
  }

  /** Reads [offset, offset+length) of a disk; zero-filled where the disk is zero. */
  async read(diskName: string, offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    const disk = this.#disk(diskName);
    if (offsetBytes < 0 || lengthBytes < 0 || offsetBytes + lengthBytes > disk.sizeBytes) {
      throw new SnapshiftError('BAD_ARGUMENT', `range ${offsetBytes}+${lengthBytes} is outside disk ${diskName} (${disk.sizeBytes} bytes)`);
    }
    const chunkSize = this.repository.chunkSizeBytes;
    const out = Buffer.alloc(lengthBytes);
    if (lengthBytes === 0) return out;
    const first = Math.floor(offsetBytes / chunkSize);
    const last = Math.floor((offsetBytes + lengthBytes - 1) / chunkSize);
    // A sequential reader gets the next chunks decoded ahead, so the workers stay busy between calls.
    const sequential = this.#lastChunk.get(diskName) === first - 1 || this.#lastChunk.get(diskName) === first || first === 0;
    this.#lastChunk.set(diskName, last);
    const wanted: number[] = [];
    for (let i = first; i <= last; i++) wanted.push(i);
    const ahead = sequential ? Math.min(last + readAheadChunks, disk.map.length / 32 - 1) : last;
    for (let i = last + 1; i <= ahead; i++) if (!this.chunkIsZero(diskName, i)) void this.#chunk(diskName, i).catch(() => undefined);
    for (let at = 0; at < wanted.length; at += readAheadChunks * 2) {
      await Promise.all(wanted.slice(at, at + readAheadChunks * 2).map(async (i) => {
        if (this.chunkIsZero(diskName, i)) return;
        const data = await this.#chunk(diskName, i);
        const chunkStart = i * chunkSize;
        const from = Math.max(offsetBytes, chunkStart);
        const to = Math.min(offsetBytes + lengthBytes, chunkStart + data.length);
        data.copy(out, from - offsetBytes, from - chunkStart, to - chunkStart);
      }));
    }
    return out;
  }

  #disk(diskName: string): { sizeBytes: number; map: Buffer } {
    const disk = this.#maps.get(diskName);
    if (!disk) throw new SnapshiftError('BAD_ARGUMENT', `restore point ${this.summary.id} has no disk ${diskName} (it has ${[...this.#maps.keys()].join(', ') || 'none'})`);
    return disk;
  }

  #chunk(diskName: string, chunkIndex: number): Promise<Buffer> {
    const key = `${diskName}\0${chunkIndex}`;
    let cached = this.#cache.get(key);
    if (cached) {
      this.#cache.delete(key);
      this.#cache.set(key, cached);
      return cached;
    }
    const map = this.#disk(diskName).map;
    const id = map.subarray(chunkIndex * 32, chunkIndex * 32 + 32);
    cached = readChunk(this.repository, id, `disk ${diskName} offset ${chunkIndex * this.repository.chunkSizeBytes}`, false);
    this.#cache.set(key, cached);
    cached.catch(() => this.#cache.delete(key));
    while (this.#cache.size > cachedChunks) this.#cache.delete(this.#cache.keys().next().value!);
    return cached;
  }
}

/** Reads and opens one chunk by id; a damaged or missing chunk is a REPO_CHUNK_DAMAGED error naming it and its pack. */
export async function readChunk(repository: Repository, id: Buffer, where: string, verify: boolean): Promise<Buffer> {
  const idHex = id.toString('hex');
  const location = repository.index.get(id);
  if (!location) throw new SnapshiftError('REPO_CHUNK_DAMAGED', `chunk ${idHex} (${where}) is missing: no index entry names it (run "snapshift check")`);
  const packName = repository.packPathOf(location.packNo);
  let blob: Buffer;
  try {
    blob = await repository.backend.getRange(packName, location.offsetBytes, location.storedLength);
  } catch (error) {
    throw new SnapshiftError('REPO_CHUNK_DAMAGED', `chunk ${idHex} (${where}) cannot be read from pack ${packName}: ${error instanceof Error ? error.message : String(error)}`, { cause: error });
  }
  const opened = await repository.pool().open(id, blob, location.compressed, verify);
  if ('damaged' in opened) throw new SnapshiftError('REPO_CHUNK_DAMAGED', `chunk ${idHex} (${where}) in pack ${packName} is damaged: ${opened.damaged}`);
  return opened.data;
}
