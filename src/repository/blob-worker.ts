import { parentPort, workerData } from 'node:worker_threads';
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { Blake3Hasher } from '@napi-rs/blake-hash';
import { zstdBinding } from './zstd-binding.ts';
import type { BlobReply, BlobRequest, BlobWorkerData } from './blob-messages.ts';

// One blob worker: the CPU-heavy steps of the data path (DESIGN.md § Data path), one chunk at a time.
const config = workerData as BlobWorkerData;
const port = parentPort!;
const dataKey = config.dataKey ? Buffer.from(config.dataKey) : undefined;
const hasher = Blake3Hasher.newKeyed(Buffer.from(config.idKey));
const cctx = new zstdBinding.CCtx();
const dctx = new zstdBinding.DCtx();
const scratch = Buffer.allocUnsafeSlow(zstdBinding.compressBound(config.maxChunkBytes));
const zeros = Buffer.alloc(config.maxChunkBytes);
const held = new Map<number, { data: Buffer; id: Buffer }>();

function keyedId(data: Buffer): Buffer {
  hasher.reset();
  hasher.update(data);
  return hasher.digestBuffer();
}

/** Pieces whose memory we own whole can be transferred instead of copied. */
function transferList(pieces: Uint8Array[]): ArrayBuffer[] {
  return pieces.filter((p) => p.byteOffset === 0 && p.byteLength === p.buffer.byteLength && p.byteLength > 4096).map((p) => p.buffer as ArrayBuffer);
}

function handle(request: BlobRequest): [BlobReply, ArrayBuffer[]] {
  const started = performance.now();
  const busy = (): number => performance.now() - started;
  switch (request.op) {
    case 'hash': {
      const data = Buffer.from(request.data.buffer, request.data.byteOffset, request.data.byteLength);
      if (data.equals(zeros.subarray(0, data.length))) return [{ task: request.task, kind: 'zero', busyMs: busy() }, []];
      const id = keyedId(data);
      held.set(request.task, { data, id });
      return [{ task: request.task, kind: 'hashed', id, busyMs: busy() }, []];
    }
    case 'drop':
      held.delete(request.task);
      return [{ task: request.task, kind: 'zero', busyMs: 0 }, []];
    case 'seal': {
      const chunk = held.get(request.task);
      held.delete(request.task);
      if (!chunk) return [{ task: request.task, kind: 'failed', reason: 'unknown task', busyMs: 0 }, []];
      let payload = chunk.data;
      let compressed = false;
      if (config.compressionLevel > 0) {
        const length = cctx.compress(scratch, chunk.data, config.compressionLevel);
        // Keep the compressed form only when it saves something: incompressible chunks then read faster.
        if (length < chunk.data.length - 64) {
          payload = scratch.subarray(0, length);
          compressed = true;
        }
      }
      let pieces: Uint8Array[];
      if (dataKey) {
        const nonce = randomBytes(12);
        const cipher = createCipheriv('aes-256-gcm', dataKey, nonce);
        cipher.setAAD(chunk.id);
        const body = cipher.update(payload);
        const final = cipher.final();
        pieces = final.length > 0 ? [nonce, body, final, cipher.getAuthTag()] : [nonce, body, cipher.getAuthTag()];
      } else {
        pieces = [compressed ? Buffer.from(payload) : payload];
      }
      const storedLength = pieces.reduce((sum, p) => sum + p.byteLength, 0);
      return [{ task: request.task, kind: 'sealed', pieces, storedLength, rawLength: chunk.data.length, compressed, busyMs: busy() }, transferList(pieces)];
    }
    case 'open': {
      const blob = Buffer.from(request.blob.buffer, request.blob.byteOffset, request.blob.byteLength);
      const id = Buffer.from(request.id);
      let payload: Buffer;
      if (dataKey) {
        if (blob.length < 28) return [{ task: request.task, kind: 'failed', reason: 'blob too short', busyMs: busy() }, []];
        const decipher = createDecipheriv('aes-256-gcm', dataKey, blob.subarray(0, 12));
        decipher.setAAD(id);
        decipher.setAuthTag(blob.subarray(blob.length - 16));
        try {
          // GCM is a stream mode: final() yields nothing, so the update's output is the plaintext (no copy).
          const body = decipher.update(blob.subarray(12, blob.length - 16));
          const tail = decipher.final();
          payload = tail.length === 0 ? body : Buffer.concat([body, tail]);
        } catch {
          return [{ task: request.task, kind: 'failed', reason: 'authentication failed (bytes changed on disk)', busyMs: busy() }, []];
        }
      } else {
        payload = blob;
      }
      let data = payload;
      if (request.compressed) {
        try {
          const size = zstdBinding.getFrameContentSize(payload);
          if (size === null || size > config.maxChunkBytes) throw new Error('bad frame size');
          data = Buffer.allocUnsafeSlow(size);
          if (dctx.decompress(data, payload) !== size) throw new Error('short frame');
        } catch (error) {
          return [{ task: request.task, kind: 'failed', reason: `cannot decompress: ${error instanceof Error ? error.message : String(error)}`, busyMs: busy() }, []];
        }
      }
      if ((request.verify || !dataKey) && !keyedId(data).equals(id)) {
        return [{ task: request.task, kind: 'failed', reason: 'content does not match its id', busyMs: busy() }, []];
      }
      return [{ task: request.task, kind: 'opened', data, busyMs: busy() }, transferList([data])];
    }
  }
}

port.on('message', (request: BlobRequest) => {
  const [reply, transfer] = handle(request);
  if (request.op !== 'drop') port.postMessage(reply, transfer);
});
