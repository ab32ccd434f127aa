import { Worker } from 'node:worker_threads';
import { fileURLToPath } from 'node:url';
import { SnapshiftError } from '../core/errors.ts';
import type { BlobReply, BlobRequest, BlobWorkerData } from './blob-messages.ts';
import type { RepositoryKeys } from './repository-keys.ts';

/** `busyMs`: the worker's time on this request, so a writer can count its own work in a shared pool. */
export type HashResult = { kind: 'zero'; busyMs: number } | { kind: 'hashed'; id: Buffer; worker: number; task: number; busyMs: number };
export interface SealedBlob {
  pieces: Buffer[];
  storedLength: number;
  rawLength: number;
  compressed: boolean;
  busyMs: number;
}

interface Pending {
  resolve: (reply: BlobReply) => void;
  reject: (error: Error) => void;
}

/**
 * worker_threads that hash, compress and encrypt chunks (and the reverse for reads). A chunk stays in the
 * worker that hashed it until the main thread, which owns the index, says whether to seal or drop it:
 * one transfer in, one out, and no CPU spent compressing duplicates.
 */
export class BlobWorkerPool {
  readonly #workers: Worker[] = [];
  readonly #outstanding: number[] = [];
  readonly #pending = new Map<number, Pending>();
  #nextTask = 1;
  #failure: Error | undefined;
  #closed = false;
  busyMs = 0;

  constructor(keys: RepositoryKeys, compressionLevel: number, maxChunkBytes: number, size = 2) {
    const entry = fileURLToPath(new URL('./blob-worker.ts', import.meta.url));
    const data: BlobWorkerData = { __entry: entry, dataKey: keys.dataKey, idKey: keys.idKey, compressionLevel, maxChunkBytes };
    for (let i = 0; i < size; i++) {
      const worker = new Worker(new URL('./worker-boot.mjs', import.meta.url), { workerData: data });
      worker.on('message', (reply: BlobReply) => this.#settle(i, reply));
      worker.on('error', (error) => this.#fail(new SnapshiftError('REPO_WORKER_FAILED', `blob worker failed: ${error.message}`, { cause: error })));
      worker.on('exit', (code) => {
        if (code !== 0 && !this.#closed) this.#fail(new SnapshiftError('REPO_WORKER_FAILED', `blob worker exited with code ${code}`));
      });
      worker.unref();
      this.#workers.push(worker);
      this.#outstanding.push(0);
    }
  }

  /** Hashes a chunk (and detects zeros). Takes ownership of `data`. */
  async hash(data: Buffer): Promise<HashResult> {
    const worker = this.#leastBusy();
    const owned = ownedCopy(data);
    const { reply, task } = await this.#send(worker, (t) => ({ op: 'hash', task: t, data: owned }), [owned.buffer as ArrayBuffer]);
    if (reply.kind === 'zero') return { kind: 'zero', busyMs: reply.busyMs };
    if (reply.kind !== 'hashed') throw new SnapshiftError('REPO_WORKER_FAILED', `unexpected worker reply ${reply.kind}`);
    return { kind: 'hashed', id: Buffer.from(reply.id), worker, task, busyMs: reply.busyMs };
  }

  /** Compresses and encrypts a chunk the worker holds from `hash`. */
  async seal(worker: number, task: number): Promise<SealedBlob> {
    const { reply } = await this.#send(worker, () => ({ op: 'seal', task }), [], task);
    if (reply.kind !== 'sealed') throw new SnapshiftError('REPO_WORKER_FAILED', `sealing a chunk failed: ${reply.kind === 'failed' ? reply.reason : reply.kind}`);
    const pieces = reply.pieces.map((p) => Buffer.from(p.buffer, p.byteOffset, p.byteLength));
    return { pieces, storedLength: reply.storedLength, rawLength: reply.rawLength, compressed: reply.compressed, busyMs: reply.busyMs };
  }

  /** Forgets a chunk the worker holds (a duplicate). */
  drop(worker: number, task: number): void {
    const request: BlobRequest = { op: 'drop', task };
    this.#workers[worker]!.postMessage(request);
  }

  /** Decrypts, decompresses and (if asked, or if unencrypted) re-hashes a blob: the plaintext or why not. */
  async open(id: Buffer, blob: Buffer, compressed: boolean, verify: boolean): Promise<{ data: Buffer } | { damaged: string }> {
    const worker = this.#leastBusy();
    const owned = ownedCopy(blob);
    const { reply } = await this.#send(worker, (t) => ({ op: 'open', task: t, id, blob: owned, compressed, verify }), [owned.buffer as ArrayBuffer]);
    if (reply.kind === 'failed') return { damaged: reply.reason };
    if (reply.kind !== 'opened') throw new SnapshiftError('REPO_WORKER_FAILED', `unexpected worker reply ${reply.kind}`);
    return { data: Buffer.from(reply.data.buffer, reply.data.byteOffset, reply.data.byteLength) };
  }

  async close(): Promise<void> {
    this.#closed = true;
    const workers = this.#workers.splice(0);
    await Promise.all(workers.map((w) => w.terminate()));
    for (const pending of this.#pending.values()) pending.reject(new SnapshiftError('REPO_CLOSED', 'the repository was closed while a chunk was in flight'));
    this.#pending.clear();
  }

  #leastBusy(): number {
    let best = 0;
    for (let i = 1; i < this.#outstanding.length; i++) if (this.#outstanding[i]! < this.#outstanding[best]!) best = i;
    return best;
  }

  #send(worker: number, make: (task: number) => BlobRequest, transfer: ArrayBuffer[], reuseTask?: number): Promise<{ reply: BlobReply; task: number }> {
    if (this.#failure) return Promise.reject(this.#failure);
    const target = this.#workers[worker];
    if (!target) return Promise.reject(new SnapshiftError('REPO_CLOSED', 'the repository is closed'));
    const task = reuseTask ?? this.#nextTask++;
    this.#outstanding[worker]!++;
    // Idle workers must not keep the process alive; busy ones must (a pending reply is all that is left).
    if (this.#pending.size === 0) for (const w of this.#workers) w.ref();
    return new Promise((resolve, reject) => {
      this.#pending.set(task, { resolve: (reply) => resolve({ reply, task }), reject });
      target.postMessage(make(task), transfer);
    });
  }

  #settle(worker: number, reply: BlobReply): void {
    this.#outstanding[worker]!--;
    this.busyMs += reply.busyMs;
    const pending = this.#pending.get(reply.task);
    this.#pending.delete(reply.task);
    if (this.#pending.size === 0) for (const w of this.#workers) w.unref();
    pending?.resolve(reply);
  }

  #fail(error: Error): void {
    this.#failure ??= error;
    for (const pending of this.#pending.values()) pending.reject(error);
    this.#pending.clear();
  }
}

/** A Buffer that owns its whole ArrayBuffer, so it can be transferred (the caller gave us ownership). */
function ownedCopy(data: Buffer): Buffer {
  if (data.byteOffset === 0 && data.byteLength === data.buffer.byteLength && !(data.buffer instanceof SharedArrayBuffer)) return data;
  const copy = Buffer.allocUnsafeSlow(data.length);
  data.copy(copy);
  return copy;
}
