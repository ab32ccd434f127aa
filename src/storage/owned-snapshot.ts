import type { StorageSnapshot, StorageSnapshotInfo } from './storage-system.ts';

/**
 * The common shape of a storage snapshot: a set of created items, a path mapping and one removal step.
 * Removal runs once, even if disposal is called again.
 */
export class OwnedStorageSnapshot implements StorageSnapshot {
  readonly createdAt = new Date();
  readonly #startedAt = performance.now();
  #removedAfterMs: number | undefined;
  #removal: Promise<void> | undefined;

  constructor(
    readonly info: readonly StorageSnapshotInfo[],
    private readonly mapImage: (imagePath: string) => string,
    private readonly remove: () => Promise<void>,
  ) {}

  imageAt(imagePath: string): string {
    return this.mapImage(imagePath);
  }

  get lifetimeMs(): number {
    return this.#removedAfterMs ?? performance.now() - this.#startedAt;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.#removal ??= this.remove().then(() => {
      this.#removedAfterMs = performance.now() - this.#startedAt;
    });
    await this.#removal;
  }
}
