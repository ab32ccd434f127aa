import { createCipheriv, createHash } from 'node:crypto';
import { NbdClient } from '../datamover/nbd/index.ts';
import { SnapshiftError } from '../core/errors.ts';

/** Writes `lengthBytes` of `byte` at `offsetBytes`, as a guest would, in pieces of at most 4 MiB. */
export async function writePattern(nbd: NbdClient, offsetBytes: number, lengthBytes: number, byte: number): Promise<void> {
  const pieceBytes = Math.min(lengthBytes, 4 * 1024 * 1024);
  const piece = Buffer.alloc(pieceBytes, byte);
  for (let at = 0; at < lengthBytes; at += pieceBytes) {
    await nbd.write(offsetBytes + at, piece.subarray(0, Math.min(pieceBytes, lengthBytes - at)));
  }
}

/** Writes deterministic pseudo-random bytes (the same `seed` and range always give the same bytes). */
export async function writeRandom(nbd: NbdClient, offsetBytes: number, lengthBytes: number, seed: number): Promise<void> {
  const pieceBytes = Math.min(lengthBytes, 4 * 1024 * 1024);
  for (let at = 0; at < lengthBytes; at += pieceBytes) {
    const length = Math.min(pieceBytes, lengthBytes - at);
    await nbd.write(offsetBytes + at, randomBytes(seed, offsetBytes + at, length));
  }
}

/**
 * The bytes `writeRandom` writes at [offsetBytes, offsetBytes + lengthBytes): an AES-128-CTR keystream
 * keyed by the seed with the counter at the disk offset, so any sub-range can be recomputed to verify.
 */
export function randomBytes(seed: number, offsetBytes: number, lengthBytes: number): Buffer {
  const key = createHash('sha256').update(`snapshift-lab-seed:${seed}`).digest().subarray(0, 16);
  const firstBlock = Math.floor(offsetBytes / 16);
  const counter = Buffer.alloc(16);
  counter.writeUInt32BE(Math.floor(firstBlock / 2 ** 32), 8);
  counter.writeUInt32BE(firstBlock >>> 0, 12);
  const skip = offsetBytes - firstBlock * 16;
  const cipher = createCipheriv('aes-128-ctr', key, counter);
  const stream = cipher.update(Buffer.alloc(skip + lengthBytes));
  return stream.subarray(skip, skip + lengthBytes);
}

export interface WriterOptions {
  socketPath: string;
  exportName: string;
  /** Target write rate; the writer sleeps to hold it. */
  rateMiBps: number;
  /** Size of each write, aligned; default 64 KiB. */
  blockBytes?: number;
  /** Seeds the choice of offsets and the data; same seed, same sequence. */
  seed: number;
  /** Region the writer touches; default the whole disk. */
  offsetBytes?: number;
  lengthBytes?: number;
}

export interface WriterCounters {
  writes: number;
  bytesWritten: number;
}

/** A guest-like workload writing steadily until stopped. */
export interface WriterHandle extends AsyncDisposable {
  readonly counters: Readonly<WriterCounters>;
  /** Stops after the write in progress, flushes, disconnects; rejects with the writer's failure if it had one. */
  stop(): Promise<WriterCounters>;
}

/**
 * Starts "a VM that writes during the backup": random aligned blocks of pattern data through NBD at a
 * steady rate. Each block's bytes are its seed-derived byte value, so a test can tell writes apart.
 */
export async function startWriter(options: WriterOptions): Promise<WriterHandle> {
  const blockBytes = options.blockBytes ?? 64 * 1024;
  if (options.rateMiBps <= 0) throw new SnapshiftError('BAD_ARGUMENT', `writer rate must be positive, not ${options.rateMiBps}`);
  const nbd = await NbdClient.connect({ socketPath: options.socketPath, exportName: options.exportName });
  const regionStart = options.offsetBytes ?? 0;
  const regionBytes = options.lengthBytes ?? nbd.sizeBytes - regionStart;
  const slots = Math.floor(regionBytes / blockBytes);
  if (slots < 1) {
    await nbd.close();
    throw new SnapshiftError('BAD_ARGUMENT', `writer region of ${regionBytes} bytes holds no ${blockBytes}-byte block`);
  }
  const counters: WriterCounters = { writes: 0, bytesWritten: 0 };
  const next = mulberry32(options.seed);
  const block = Buffer.alloc(blockBytes);
  const bytesPerMs = (options.rateMiBps * 1024 * 1024) / 1000;
  let stopping = false;
  const started = performance.now();
  const loop = (async () => {
    while (!stopping) {
      const offset = regionStart + Math.floor(next() * slots) * blockBytes;
      block.fill(1 + Math.floor(next() * 255));
      await nbd.write(offset, block);
      counters.writes += 1;
      counters.bytesWritten += blockBytes;
      const aheadMs = counters.bytesWritten / bytesPerMs - (performance.now() - started);
      if (aheadMs > 0) await new Promise((resolve) => setTimeout(resolve, aheadMs));
    }
    await nbd.flush();
  })();
  loop.catch(() => undefined); // surfaced by stop()
  const stop = async (): Promise<WriterCounters> => {
    stopping = true;
    try {
      await loop;
    } finally {
      await nbd.close();
    }
    return { ...counters };
  };
  return { counters, stop, [Symbol.asyncDispose]: async () => void (await stop()) };
}

/** Small seeded PRNG (mulberry32): deterministic offsets for a given seed. */
function mulberry32(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
