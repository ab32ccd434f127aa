import { randomBytes } from 'node:crypto';
import { SnapshiftError } from '../core/errors.ts';
import { faultPoint } from '../core/fault-points.ts';
import type { Repository } from './repository.ts';
import type { RepositoryLock } from './repository-lock.ts';
import type { RestorePointReader } from './restore-point-reader.ts';
import { PackWriter } from './pack-writer.ts';
import type { BlobEntry } from './pack-format.ts';
import { chunkCountOf, encodeManifest, manifestPath, summaryOf, zeroId, type ManifestHeader, type RestorePointSummary } from './manifest.ts';

export interface WriterStats {
  chunksWritten: number;
  bytesIn: number;
  zeroBytes: number;
  dedupBytes: number;
  storedBytes: number;
  compressedInBytes: number;
  compressedOutBytes: number;
  workerBusyMs: number;
  writeBusyMs: number;
}

export interface DiskWriter {
  /** offsetBytes is chunk-aligned; data.length == chunk size except for the disk's last chunk. Takes ownership of `data`. */
  putChunk(offsetBytes: number, data: Buffer): Promise<void>;
  /** Marks a chunk-aligned range as all zero (holes) without data. */
  putZero(offsetBytes: number, lengthBytes: number): Promise<void>;
}

/**
 * One restore point being written (docs/FORMAT.md): chunks flow through the blob workers into packs; index
 * files follow sealed packs; the manifest is written last. A bounded number of chunks is in flight.
 * Writers of one process share the repository's list of unindexed packs (`Repository.flushIndex`).
 */
export class BackupWriter {
  readonly stats: WriterStats = { chunksWritten: 0, bytesIn: 0, zeroBytes: 0, dedupBytes: 0, storedBytes: 0, compressedInBytes: 0, compressedOutBytes: 0, workerBusyMs: 0, writeBusyMs: 0 };
  readonly #disks: Array<{ name: string; sizeBytes: number; map: Buffer }> = [];
  readonly #packWriter: PackWriter;
  /** Ids in packs not yet sealed (not yet in the index): a duplicate of one of them is not stored twice. */
  readonly #pendingIds = new Set<string>();
  readonly #maxInFlight: number;
  #inFlight = 0;
  #waiters: Array<() => void> = [];
  #failure: unknown;
  #finished = false;
  /** The blob workers' time on this writer's chunks only: the pool is shared by tasks running side by side. */
  #workerBusyMs = 0;

  constructor(
    readonly repository: Repository,
    readonly lock: RepositoryLock,
    readonly vmName: string,
    readonly base: RestorePointReader | undefined,
  ) {
    this.#packWriter = new PackWriter(repository.backend, repository.keys, repository.config.packTargetBytes, (packId, blobs) => this.#onSealed(packId, blobs));
    this.#maxInFlight = 4 * repository.workerCount;
  }

  addDisk(name: string, sizeBytes: number): DiskWriter {
    if (this.#disks.some((d) => d.name === name)) throw new SnapshiftError('BAD_ARGUMENT', `disk ${name} was declared twice`);
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0) throw new SnapshiftError('BAD_ARGUMENT', `disk ${name}: bad size ${sizeBytes}`);
    const chunkSize = this.repository.chunkSizeBytes;
    const map = Buffer.alloc(chunkCountOf(sizeBytes, chunkSize) * 32);
    const baseMap = this.base?.mapOf(name);
    if (baseMap) baseMap.copy(map, 0, 0, Math.min(baseMap.length, map.length));
    const disk = { name, sizeBytes, map };
    this.#disks.push(disk);
    const check = (offsetBytes: number, lengthBytes: number): void => {
      if (offsetBytes % chunkSize !== 0 || offsetBytes < 0 || offsetBytes + lengthBytes > sizeBytes) {
        throw new SnapshiftError('BAD_ARGUMENT', `disk ${name}: range ${offsetBytes}+${lengthBytes} is not chunk-aligned or beyond the disk's ${sizeBytes} bytes`);
      }
    };
    return {
      putChunk: async (offsetBytes, data) => {
        this.#checkUsable();
        const expected = Math.min(chunkSize, sizeBytes - offsetBytes);
        if (data.length !== expected) throw new SnapshiftError('BAD_ARGUMENT', `disk ${name}: chunk at ${offsetBytes} has ${data.length} bytes, expected ${expected}`);
        check(offsetBytes, data.length);
        while (this.#inFlight >= this.#maxInFlight) await new Promise<void>((resolve) => this.#waiters.push(resolve));
        this.#checkUsable();
        this.#inFlight++;
        this.stats.chunksWritten++;
        this.stats.bytesIn += data.length;
        void this.#process(map, offsetBytes / chunkSize, data).finally(() => {
          this.#inFlight--;
          this.#waiters.shift()?.();
        });
      },
      putZero: async (offsetBytes, lengthBytes) => {
        this.#checkUsable();
        if (lengthBytes % chunkSize !== 0 && offsetBytes + lengthBytes !== sizeBytes) throw new SnapshiftError('BAD_ARGUMENT', `disk ${name}: zero range ${offsetBytes}+${lengthBytes} does not end on a chunk boundary`);
        check(offsetBytes, lengthBytes);
        map.fill(0, (offsetBytes / chunkSize) * 32, Math.ceil((offsetBytes + lengthBytes) / chunkSize) * 32);
        this.stats.zeroBytes += lengthBytes;
      },
    };
  }

  async #process(map: Buffer, chunkIndex: number, data: Buffer): Promise<void> {
    const length = data.length;
    try {
      const pool = this.repository.pool();
      const hashed = await pool.hash(data);
      this.#workerBusyMs += hashed.busyMs;
      if (hashed.kind === 'zero') {
        map.fill(0, chunkIndex * 32, chunkIndex * 32 + 32);
        this.stats.zeroBytes += length;
        return;
      }
      hashed.id.copy(map, chunkIndex * 32);
      const key = hashed.id.toString('hex');
      if (this.repository.index.has(hashed.id) || this.#pendingIds.has(key)) {
        pool.drop(hashed.worker, hashed.task);
        this.stats.dedupBytes += length;
        return;
      }
      this.#pendingIds.add(key);
      const sealed = await pool.seal(hashed.worker, hashed.task);
      this.#workerBusyMs += sealed.busyMs;
      this.stats.compressedInBytes += length;
      this.stats.compressedOutBytes += sealed.storedLength;
      await this.#packWriter.add(hashed.id, sealed.pieces, sealed.storedLength, sealed.rawLength, sealed.compressed);
    } catch (error) {
      this.#failure ??= error;
    }
  }

  async #onSealed(packId: string, blobs: BlobEntry[]): Promise<void> {
    faultPoint('repo.after-pack-write');
    const indexDue = this.repository.packSealed(packId, blobs);
    for (const blob of blobs) this.#pendingIds.delete(blob.id.toString('hex'));
    if (indexDue) await this.repository.flushIndex();
  }

  async #drain(): Promise<void> {
    while (this.#inFlight > 0) await new Promise<void>((resolve) => this.#waiters.push(resolve));
  }

  #checkUsable(): void {
    if (this.#finished) throw new SnapshiftError('REPO_WRITER_CLOSED', 'this backup writer has already committed or aborted');
    if (this.#failure) throw this.#failure;
  }

  #updateStats(): void {
    this.stats.storedBytes = this.#packWriter.storedBytes;
    this.stats.writeBusyMs = this.#packWriter.writeBusyMs;
    this.stats.workerBusyMs = this.#workerBusyMs;
  }

  /**
   * Waits for every chunk handed over so far to be stored (last pack sealed, index written) and returns the
   * final stats. Task statistics must be taken after this: before it, chunks still in the workers and the
   * pack being filled are not counted (transferred bytes and busy times would read 0).
   */
  async settle(): Promise<WriterStats> {
    this.#checkUsable();
    await this.#drain();
    if (this.#failure) throw this.#failure;
    await this.#packWriter.flush();
    faultPoint('repo.after-last-pack');
    await this.repository.flushIndex();
    this.#updateStats();
    return this.stats;
  }

  /** Writes the last pack, the index files and then the manifest; returns the new restore point. */
  async commit(extra: Record<string, unknown> = {}): Promise<RestorePointSummary> {
    if (this.#finished) throw new SnapshiftError('REPO_WRITER_CLOSED', 'this backup writer has already committed or aborted');
    try {
      await this.settle();
      const header: ManifestHeader = {
        id: randomBytes(16).toString('hex'),
        vmName: this.vmName,
        createdAt: new Date().toISOString(),
        chunkSizeBytes: this.repository.chunkSizeBytes,
        ...(this.base ? { baseId: this.base.summary.id } : {}),
        extra,
        disks: this.#disks.map((disk) => {
          let zeroChunks = 0;
          for (let at = 0; at < disk.map.length; at += 32) if (disk.map.compare(zeroId, 0, 32, at, at + 32) === 0) zeroChunks++;
          return { name: disk.name, sizeBytes: disk.sizeBytes, storedChunks: disk.map.length / 32 - zeroChunks, zeroChunks };
        }),
      };
      // Every pack this manifest names must be in an index file first, also packs another writer of this
      // process sealed and we deduplicated against (their index file may not be written yet).
      await this.repository.flushIndex();
      await this.#putManifest(header);
      this.#updateStats();
      this.#finished = true;
      await this.lock.release();
      return summaryOf(header);
    } catch (error) {
      await this.abort().catch(() => undefined);
      throw error;
    }
  }

  /** The manifest is the commit point: durable under its temp name first, then renamed into manifests/. */
  async #putManifest(header: ManifestHeader): Promise<void> {
    const upload = await this.repository.backend.openUpload(manifestPath(header.id));
    try {
      await upload.write(encodeManifest(this.repository.keys, header, this.#disks.map((d) => d.map)));
      await upload.sync();
      faultPoint('repo.before-manifest-rename');
      await upload.commit();
    } catch (error) {
      await upload.abort();
      throw error;
    }
    faultPoint('repo.after-manifest-rename');
  }

  /** Drops the unfinished restore point (sealed packs stay, indexed, for gc) and releases the lock. */
  async abort(): Promise<void> {
    if (this.#finished) return;
    this.#finished = true;
    try {
      await this.#drain();
      await this.#packWriter.abort();
      try {
        await this.repository.flushIndex();
      } catch {
        // The in-memory index now names packs no index file lists: reload before the next backup.
        this.repository.markIndexStale();
      }
      this.#updateStats();
    } finally {
      await this.lock.release();
    }
  }
}
