import { statfs } from 'node:fs/promises';
import { allocatedBytes } from '../overlay-vm-snapshot.ts';
import { dirname } from 'node:path';

export interface ScratchGuardOptions {
  /**
   * Give the point in time up when the scratch images' file system has less free space than this, plus
   * twice what the scratch grew by since the previous look; default 256 MiB.
   */
  minFreeBytes?: number;
  /** Give the point in time up when the scratch images together take more than this; default no limit. */
  maxScratchBytes?: number;
  /** How often to look; default 50 ms. */
  pollMs?: number;
}

const defaultMinFreeBytes = 256 * 1024 * 1024;
const defaultPollMs = 50;


/**
 * Watches the scratch images of a fleecing and calls `onLow` (once) before their file system can fill up.
 *
 * Why it exists: QEMU 7.2's `blockdev-backup` inserts its copy-before-write filter with the default
 * `on-cbw-error=break-guest-write` and no way to change it (the option reached blockdev-backup only in
 * later QEMU; the filter has no reopen), so a copy into a full scratch fails the *guest's* write with
 * ENOSPC (measured: NBD WRITE … failed: ENOSPC). `onLow` ends the fleecing first: the guest then writes
 * straight to its disk again, and the backup, not the guest, fails. It cannot help with a scratch that
 * fails for another reason (an I/O error of its storage): on 7.2 that still reaches the guest.
 */
export class ScratchGuard {
  readonly #paths: readonly string[];
  readonly #folders: readonly string[];
  readonly #minFreeBytes: number;
  readonly #maxScratchBytes: number;
  readonly #pollMs: number;
  readonly #onLow: (reason: string) => Promise<void>;
  #timer: NodeJS.Timeout | undefined;
  #tick: Promise<void> | undefined;
  #stopped = false;
  #previousBytes = 0;
  /** The scratch images' size at the last look. */
  scratchBytes = 0;

  constructor(paths: readonly string[], options: ScratchGuardOptions, onLow: (reason: string) => Promise<void>) {
    this.#paths = paths;
    this.#folders = [...new Set(paths.map((path) => dirname(path)))];
    this.#minFreeBytes = options.minFreeBytes ?? defaultMinFreeBytes;
    this.#maxScratchBytes = options.maxScratchBytes ?? Number.POSITIVE_INFINITY;
    this.#pollMs = options.pollMs ?? defaultPollMs;
    this.#onLow = onLow;
  }

  start(): void {
    if (this.#stopped || this.#timer) return;
    this.#schedule();
  }

  /** Stops watching; resolves once a look in progress has ended. */
  async stop(): Promise<void> {
    this.#stopped = true;
    clearTimeout(this.#timer);
    await this.#tick;
  }

  #schedule(): void {
    this.#timer = setTimeout(() => {
      this.#tick = this.#look().then(
        () => (this.#stopped ? undefined : this.#schedule()),
        () => (this.#stopped ? undefined : this.#schedule()),
      );
    }, this.#pollMs);
    this.#timer.unref();
  }

  async #look(): Promise<void> {
    let scratchBytes = 0;
    for (const path of this.#paths) scratchBytes += await allocatedBytes(path);
    const growthBytes = Math.max(0, scratchBytes - this.#previousBytes);
    this.#previousBytes = scratchBytes;
    this.scratchBytes = scratchBytes;
    if (scratchBytes > this.#maxScratchBytes) return this.#low(`the scratch images hold ${scratchBytes} bytes, more than the ${this.#maxScratchBytes} allowed`);
    for (const folder of this.#folders) {
      const fs = await statfs(folder);
      const freeBytes = fs.bavail * fs.bsize;
      if (freeBytes < this.#minFreeBytes + 2 * growthBytes) {
        return this.#low(`only ${freeBytes} bytes are free in ${folder}, where the scratch images grow (by ${growthBytes} bytes in the last ${this.#pollMs} ms)`);
      }
    }
  }

  async #low(reason: string): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    await this.#onLow(reason);
  }
}
