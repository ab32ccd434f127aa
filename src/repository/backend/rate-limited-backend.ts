import { TokenBucket } from '../../core/token-bucket.ts';
import type { BackendEntry, BackendUpload, StorageBackend } from './storage-backend.ts';

/**
 * Wraps a backend so writes pass at most `bytesPerSecond` (restic's limiter, as a wrapper that adds one
 * behaviour). Reads are not limited: restores should not pay for a backup-window setting.
 */
export class RateLimitedBackend implements StorageBackend {
  readonly #bucket: TokenBucket;

  constructor(
    private readonly inner: StorageBackend,
    bytesPerSecond: number,
  ) {
    this.#bucket = new TokenBucket(bytesPerSecond);
  }

  get location(): string {
    return this.inner.location;
  }

  async put(name: string, data: Buffer | readonly Buffer[]): Promise<void> {
    await this.#bucket.take(Array.isArray(data) ? data.reduce((total: number, piece: Buffer) => total + piece.length, 0) : (data as Buffer).length);
    await this.inner.put(name, data);
  }

  async openUpload(name: string): Promise<BackendUpload> {
    const upload = await this.inner.openUpload(name);
    const bucket = this.#bucket;
    return {
      async write(pieces: readonly Buffer[]) {
        await bucket.take(pieces.reduce((total, piece) => total + piece.length, 0));
        await upload.write(pieces);
      },
      get writtenBytes() {
        return upload.writtenBytes;
      },
      sync: () => upload.sync(),
      commit: () => upload.commit(),
      abort: () => upload.abort(),
    };
  }

  get(name: string): Promise<Buffer> {
    return this.inner.get(name);
  }

  getRange(name: string, offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    return this.inner.getRange(name, offsetBytes, lengthBytes);
  }

  list(folder: string): Promise<BackendEntry[]> {
    return this.inner.list(folder);
  }

  delete(name: string): Promise<void> {
    return this.inner.delete(name);
  }

  exists(name: string): Promise<boolean> {
    return this.inner.exists(name);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
