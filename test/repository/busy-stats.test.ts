import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import type { BackendUpload, StorageBackend } from '../../src/repository/backend/storage-backend.ts';
import { PackWriter } from '../../src/repository/pack-writer.ts';
import { keysFromMaster, newMasterKey } from '../../src/repository/repository-keys.ts';
import { initRepository, openRepository } from '../../src/repository/index.ts';
import { mixedDisk, tempDir } from './helpers.ts';

/** A backend whose writes take `writeMs` and whose commits (fsync, rename) take `commitMs`; `summedMs` adds up every call's time. */
function slowBackend(writeMs: number, commitMs: number): StorageBackend & { summedMs: number } {
  const refuse = () => Promise.reject(new Error('not used by this test'));
  const backend = {
    summedMs: 0,
    location: 'memory',
    put: refuse,
    get: refuse,
    getRange: refuse,
    list: refuse,
    delete: refuse,
    exists: refuse,
    close: () => Promise.resolve(),
    openUpload: async (): Promise<BackendUpload> => {
      let writtenBytes = 0;
      const timed = async (ms: number) => {
        const started = performance.now();
        await sleep(ms);
        backend.summedMs += performance.now() - started;
      };
      return {
        get writtenBytes() {
          return writtenBytes;
        },
        write: async (pieces) => {
          await timed(writeMs);
          for (const piece of pieces) writtenBytes += piece.length;
        },
        sync: () => Promise.resolve(),
        commit: () => timed(commitMs),
        abort: () => Promise.resolve(),
      };
    },
  };
  return backend;
}

test('the target busy time of a pack writer is the union of its appends and seals, never more than the wall time', async () => {
  const keys = keysFromMaster(newMasterKey(), true);
  // Every blob fills a pack: each seal (trailer write, commit) runs in the background while the next append writes.
  const backend = slowBackend(60, 100);
  const writer = new PackWriter(backend, keys, 1, () => undefined);
  const started = performance.now();
  for (let n = 0; n < 4; n++) await writer.add(Buffer.alloc(32, n), [Buffer.alloc(100, n)], 100, 100, false);
  await writer.flush();
  const wallMs = performance.now() - started;
  const busy = writer.writeBusyMs.toFixed(0);
  assert.ok(writer.writeBusyMs <= wallMs + 1, `busy ${busy} ms within the wall time ${wallMs.toFixed(0)} ms`);
  assert.ok(writer.writeBusyMs >= 0.9 * wallMs, `the backend was busy almost all along (${busy} of ${wallMs.toFixed(0)} ms)`);
  // Three appends ran beside a seal: the sum of the calls' times is at least 3 × 60 ms more than their union.
  assert.ok(writer.writeBusyMs <= backend.summedMs - 150, `overlaps are counted once (${busy} ms, the sum is ${backend.summedMs.toFixed(0)} ms)`);
});

test('two backups side by side on one worker pool each count only their own workers\' time', async () => {
  await using dir = await tempDir();
  await initRepository(dir.path, { encryption: true, password: 'p', chunkSizeBytes: 256 * 1024 });
  await using repository = await openRepository(dir.path, { password: 'p' });
  const poolBefore = repository.pool().busyMs;
  const writeOne = async (vmName: string, seed: number, sizeBytes: number) => {
    const writer = await repository.startBackup({ vmName });
    const data = mixedDisk(sizeBytes, 256 * 1024, seed);
    const disk = writer.addDisk('disk0', data.length);
    for (let at = 0; at < data.length; at += 256 * 1024) await disk.putChunk(at, Buffer.from(data.subarray(at, at + 256 * 1024)));
    const stats = await writer.settle();
    await writer.commit();
    return stats.workerBusyMs;
  };
  const [small, large] = await Promise.all([writeOne('small', 1, 2 * 1024 * 1024), writeOne('large', 2, 16 * 1024 * 1024)]);
  const poolMs = repository.pool().busyMs - poolBefore;
  assert.ok(small > 0 && large > 0);
  // Before, each writer reported the pool's whole busy time since it started: together about twice the pool's.
  assert.ok(Math.abs(small + large - poolMs) <= 1e-6 * poolMs + 1e-9, `the two tasks' shares (${small.toFixed(1)} + ${large.toFixed(1)} ms) add up to the pool's ${poolMs.toFixed(1)} ms`);
  assert.ok(small < large, 'the task with 8 times the data did more of the work');
});
