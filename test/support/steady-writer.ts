import { randomBytes as cryptoRandomBytes } from 'node:crypto';
import { NbdClient } from '../../src/datamover/nbd/index.ts';
import { randomBytes as seededBytes } from '../../src/lab/nbd-writer.ts';

/**
 * A guest that writes at a steady rate, and the means to prove any image is a point in time of it.
 *
 * Write n (n = 1, 2, …) fills block (n-1) mod K of a region with bytes derived from n, its first 8 bytes
 * being n itself. Writes are sequential (one in flight), so a crash-consistent snapshot holds exactly the
 * writes 1..S for some cut S: `cutOf` reads S back from an image and `expectedAt(S)` rebuilds the whole image
 * the guest had then, to compare byte for byte.
 */
export class SteadyWriter {
  readonly blockBytes = 64 * 1024;
  readonly blockCount: number;
  /** The last write that completed. */
  completed = 0;
  /** When write n was sent (index n - 1), in `performance.now()` milliseconds. */
  readonly sentAtMs: number[] = [];
  /** When write n completed (index n - 1). */
  readonly completedAtMs: number[] = [];
  readonly errors: Error[] = [];
  #running = false;
  #loop: Promise<void> | undefined;
  #nbd: NbdClient | undefined;

  private constructor(
    readonly initialImage: Buffer,
    readonly regionOffsetBytes: number,
    regionBytes: number,
    readonly intervalMs: number,
    private readonly connect: () => Promise<NbdClient>,
  ) {
    this.blockCount = regionBytes / this.blockBytes;
  }

  /**
   * Writes random data to `dataRanges` of a fresh disk through `connect` (the region stays zero), and returns
   * a writer that knows the disk's content; call `start` to begin writing.
   */
  static async prepare(options: {
    connect: () => Promise<NbdClient>;
    sizeBytes: number;
    dataRanges: Array<[offsetBytes: number, lengthBytes: number]>;
    regionOffsetBytes: number;
    regionBytes: number;
    intervalMs: number;
  }): Promise<SteadyWriter> {
    const image = Buffer.alloc(options.sizeBytes);
    await using nbd = await options.connect();
    for (const [offset, length] of options.dataRanges) {
      const data = cryptoRandomBytes(length);
      data.copy(image, offset);
      await nbd.write(offset, data);
    }
    await nbd.flush();
    return new SteadyWriter(image, options.regionOffsetBytes, options.regionBytes, options.intervalMs, options.connect);
  }

  blockData(n: number): Buffer {
    const data = seededBytes(n, 0, this.blockBytes);
    data.writeBigUInt64LE(BigInt(n), 0);
    return data;
  }

  offsetOf(n: number): number {
    return this.regionOffsetBytes + ((n - 1) % this.blockCount) * this.blockBytes;
  }

  start(): void {
    if (this.#running) return;
    this.#running = true;
    this.#loop = (async () => {
      this.#nbd = await this.connect();
      while (this.#running) {
        const n = this.completed + 1;
        const data = this.blockData(n);
        try {
          this.sentAtMs[n - 1] = performance.now();
          await this.#nbd.write(this.offsetOf(n), data);
          this.completedAtMs[n - 1] = performance.now();
          this.completed = n;
        } catch (error) {
          this.errors.push(error as Error);
          this.#running = false;
          break;
        }
        await new Promise((resolve) => setTimeout(resolve, this.intervalMs));
      }
      await this.#nbd.close().catch(() => undefined);
      this.#nbd = undefined;
    })().catch((error: unknown) => {
      this.errors.push(error as Error);
    });
  }

  /**
   * Resolves once `count` more writes have completed, so a backup that follows has new data to store; fails
   * (naming what the writer saw) if they do not come within `timeoutMs`.
   */
  async waitForWrites(count: number, timeoutMs = 15_000): Promise<void> {
    const target = this.completed + count;
    const deadline = performance.now() + timeoutMs;
    while (this.completed < target) {
      if (this.errors.length > 0) throw new Error(`the guest's writes failed: ${this.errors.map((error) => error.message).join('; ')}`);
      if (performance.now() > deadline) throw new Error(`the guest made ${count - (target - this.completed)} of ${count} writes in ${timeoutMs} ms (running: ${this.#running}): it is stalled`);
      await new Promise((resolve) => setTimeout(resolve, this.intervalMs));
    }
  }

  /** Stops after the write in flight; returns the last completed write. */
  async stop(): Promise<number> {
    this.#running = false;
    await this.#loop;
    return this.completed;
  }

  /** Latencies (ms) of the completed writes sent within [fromMs, toMs) of `performance.now()`. */
  latenciesMs(fromMs = 0, toMs = Number.POSITIVE_INFINITY): number[] {
    const latencies: number[] = [];
    for (let index = 0; index < this.completed; index++) {
      const sentAt = this.sentAtMs[index]!;
      if (sentAt >= fromMs && sentAt < toMs) latencies.push(this.completedAtMs[index]! - sentAt);
    }
    return latencies;
  }

  /** The `fraction` percentile (0.5, 0.99) of `values`, nearest rank; NaN when empty. */
  static percentile(values: readonly number[], fraction: number): number {
    if (values.length === 0) return Number.NaN;
    const sorted = [...values].sort((a, b) => a - b);
    return sorted[Math.min(sorted.length - 1, Math.ceil(fraction * sorted.length) - 1)]!;
  }

  /** The cut of an image: the highest write number found in the region (0 if none). */
  cutOf(image: Buffer): number {
    let cut = 0;
    for (let block = 0; block < this.blockCount; block++) {
      const n = Number(image.readBigUInt64LE(this.regionOffsetBytes + block * this.blockBytes));
      if (n > cut) cut = n;
    }
    return cut;
  }

  /** The guest's whole disk right after write `cut` completed. */
  expectedAt(cut: number): Buffer {
    const image = Buffer.from(this.initialImage);
    for (let block = 0; block < this.blockCount; block++) {
      if (cut < block + 1) continue;
      const n = block + 1 + this.blockCount * Math.floor((cut - block - 1) / this.blockCount);
      this.blockData(n).copy(image, this.regionOffsetBytes + block * this.blockBytes);
    }
    return image;
  }

  /** Where two images first differ, for a readable failure; undefined when equal. */
  static firstDifference(actual: Buffer, expected: Buffer): number | undefined {
    if (actual.equals(expected)) return undefined;
    const length = Math.min(actual.length, expected.length);
    const step = 4096;
    for (let at = 0; at < length; at += step) {
      if (actual.compare(expected, at, Math.min(at + step, length), at, Math.min(at + step, length)) !== 0) return at;
    }
    return length;
  }
}
