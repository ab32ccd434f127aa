import { randomBytes } from 'node:crypto';
import { BusyClock } from '../core/busy-clock.ts';
import type { BackendUpload, StorageBackend } from './backend/storage-backend.ts';
import type { RepositoryKeys } from './repository-keys.ts';
import { encodePackTrailer, packPath, type BlobEntry } from './pack-format.ts';

/**
 * Appends blobs to packs of ~packTargetBytes, written incrementally (never a whole pack in memory) and
 * renamed into data/ only once the trailer is on disk. At most one sealed pack is being fsync'd in the
 * background while the next one fills.
 */
export class PackWriter {
  #upload: { packId: string; upload: BackendUpload; blobs: BlobEntry[] } | undefined;
  #chain: Promise<void> = Promise.resolve();
  #sealing: Promise<void> = Promise.resolve();
  /** The first write failure: every later add and flush rethrows it (and no promise is left unhandled). */
  #failure: unknown;
  /** Appends and seals overlap (one pack is fsync'd while the next fills): busy is their union, not their sum. */
  readonly #writeClock = new BusyClock();
  storedBytes = 0;

  constructor(
    readonly backend: StorageBackend,
    readonly keys: RepositoryKeys,
    readonly packTargetBytes: number,
    /** Called once a pack is complete on disk, in the order packs are sealed. */
    readonly onSealed: (packId: string, blobs: BlobEntry[]) => Promise<void> | void,
  ) {}

  /** Time with at least one backend write (append or seal) in flight. */
  get writeBusyMs(): number {
    return this.#writeClock.busyMs;
  }

  /** Appends one blob; resolves with its place once written (not yet durable: that comes with the seal). */
  add(id: Buffer, pieces: readonly Buffer[], storedLength: number, rawLength: number, compressed: boolean): Promise<{ packId: string; offsetBytes: number }> {
    const step = this.#chain.then(async () => {
      if (this.#failure) throw this.#failure;
      const { current, offsetBytes } = await this.#writeClock.time(async () => {
        if (!this.#upload) {
          const packId = randomBytes(32).toString('hex');
          this.#upload = { packId, upload: await this.backend.openUpload(packPath(packId)), blobs: [] };
        }
        const current = this.#upload;
        const offsetBytes = current.upload.writtenBytes;
        await current.upload.write(pieces);
        current.blobs.push({ id, offsetBytes, storedLength, rawLength, compressed });
        this.storedBytes += storedLength;
        return { current, offsetBytes };
      });
      if (current.upload.writtenBytes >= this.packTargetBytes) await this.#seal();
      return { packId: current.packId, offsetBytes };
    });
    this.#chain = step.then(
      () => undefined,
      (error: unknown) => void (this.#failure ??= error),
    );
    return step;
  }

  /** Seals the pack being filled and waits until every pack is durable. */
  async flush(): Promise<void> {
    await this.#chain;
    if (this.#failure) throw this.#failure;
    await this.#seal();
    await this.#sealing;
  }

  /** Drops the pack being filled (its temp file goes); sealed packs stay for gc. */
  async abort(): Promise<void> {
    await this.#chain;
    await this.#sealing.catch(() => undefined);
    const current = this.#upload;
    this.#upload = undefined;
    await current?.upload.abort();
  }

  async #seal(): Promise<void> {
    const current = this.#upload;
    this.#upload = undefined;
    if (!current) return;
    await this.#sealing; // at most one pack in flight to disk; also surfaces its error
    this.#sealing = (async () => {
      this.#writeClock.begin();
      try {
        const trailer = encodePackTrailer(this.keys, current.blobs);
        await current.upload.write([trailer]);
        this.storedBytes += trailer.length;
        await current.upload.commit();
      } catch (error) {
        await current.upload.abort().catch(() => undefined);
        throw error;
      } finally {
        this.#writeClock.end();
      }
      await this.onSealed(current.packId, current.blobs);
    })();
    // Surface a failure on the next add or flush, not as an unhandled rejection.
    this.#sealing.catch(() => undefined);
  }
}
