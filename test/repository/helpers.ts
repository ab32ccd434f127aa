import { mkdtemp, rm, readdir } from 'node:fs/promises';
import { createCipheriv, createHash } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Repository, RestorePointSummary } from '../../src/repository/index.ts';

export async function tempDir(): Promise<{ path: string; [Symbol.asyncDispose](): Promise<void> }> {
  const path = await mkdtemp(join(tmpdir(), 'snapshift-repo-test-'));
  return { path, [Symbol.asyncDispose]: () => rm(path, { recursive: true, force: true }) };
}

export function md5(data: Buffer): string {
  return createHash('md5').update(data).digest('hex');
}

/** A disk image with random, text-like, zero and repeated regions, deterministic from `seed`. */
export function mixedDisk(sizeBytes: number, chunkSize: number, seed: number): Buffer {
  const disk = Buffer.alloc(sizeBytes);
  const random = createHash('sha256').update(String(seed)).digest();
  for (let at = 0, n = 0; at < sizeBytes; at += chunkSize, n++) {
    const end = Math.min(sizeBytes, at + chunkSize);
    switch (n % 4) {
      case 0: seededBytes(random, n, end - at).copy(disk, at); break;
      case 1: disk.fill(`seed ${seed} chunk ${n} some text that compresses well `, at, end); break;
      case 2: break; // zero
      case 3: disk.copy(disk, at, 0, end - at); break; // duplicate of chunk 0
    }
  }
  random.copy(disk, 0, 0, Math.min(32, sizeBytes));
  return disk;
}

/** Backs up disks given as Buffers, writing zero chunks as holes where `sparse` says so. */
export async function backup(repository: Repository, vmName: string, disks: Record<string, Buffer>, opts: { base?: string; onlyChunks?: Set<number>; sparseZeros?: boolean } = {}): Promise<RestorePointSummary> {
  const writer = await repository.startBackup({ vmName, baseRestorePointId: opts.base });
  const chunkSize = repository.chunkSizeBytes;
  try {
    for (const [name, data] of Object.entries(disks)) {
      const disk = writer.addDisk(name, data.length);
      for (let at = 0, n = 0; at < data.length; at += chunkSize, n++) {
        if (opts.onlyChunks && !opts.onlyChunks.has(n)) continue;
        const chunk = Buffer.from(data.subarray(at, Math.min(data.length, at + chunkSize)));
        if (opts.sparseZeros && chunk.every((b) => b === 0)) await disk.putZero(at, chunk.length);
        else await disk.putChunk(at, chunk);
      }
    }
    return await writer.commit({ test: true });
  } catch (error) {
    await writer.abort();
    throw error;
  }
}

export async function restoreAll(repository: Repository, id: string, diskName: string, pieceBytes = 3 * 100_003): Promise<Buffer> {
  const reader = await repository.openRestorePoint(id);
  const size = reader.summary.disks.find((d) => d.name === diskName)!.sizeBytes;
  const pieces: Buffer[] = [];
  for (let at = 0; at < size; at += pieceBytes) pieces.push(await reader.read(diskName, at, Math.min(pieceBytes, size - at)));
  return Buffer.concat(pieces);
}

export async function packCount(path: string): Promise<number> {
  let count = 0;
  for (const folder of await readdir(join(path, 'data'))) count += (await readdir(join(path, 'data', folder))).length;
  return count;
}

/** Deterministic pseudo-random bytes: AES-256-CTR keystream of a seed. */
export function seededBytes(seed: Buffer, stream: number, length: number): Buffer {
  const iv = Buffer.alloc(16);
  iv.writeUInt32LE(stream, 0);
  return createCipheriv('aes-256-ctr', seed, iv).update(Buffer.alloc(length));
}
