import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { initRepository, openRepository } from '../../src/repository/index.ts';
import { ChunkIndex } from '../../src/repository/chunk-index.ts';
import { backup, md5, mixedDisk, packCount, restoreAll, tempDir } from './helpers.ts';

const chunk = 256 * 1024;

for (const variant of [
  { name: 'encrypted, zstd:1', encryption: true, compression: 'zstd:1' },
  { name: 'unencrypted, no compression', encryption: false, compression: 'none' },
]) {
  test(`round trip of random, zero, duplicated and sparse disks of several sizes (${variant.name})`, async () => {
    await using dir = await tempDir();
    await initRepository(dir.path, { password: variant.encryption ? 'secret' : undefined, encryption: variant.encryption, chunkSizeBytes: chunk, compression: variant.compression });
    await using repository = await openRepository(dir.path, { password: variant.encryption ? 'secret' : undefined });
    const disks: Record<string, Buffer> = {
      tiny: randomBytes(1),
      oneChunkMinus: randomBytes(chunk - 1),
      exact: mixedDisk(4 * chunk, chunk, 1),
      ragged: mixedDisk(7 * chunk + 12_345, chunk, 2),
      allZero: Buffer.alloc(3 * chunk + 5),
      empty: Buffer.alloc(0),
    };
    const point = await backup(repository, 'vm1', disks, { sparseZeros: true });
    const reader = await repository.openRestorePoint(point.id);
    for (const [name, data] of Object.entries(disks)) {
      assert.equal(md5(await restoreAll(repository, point.id, name)), md5(data), `disk ${name} reads back identical`);
    }
    // Unaligned ranges across chunk borders.
    const ragged = disks.ragged!;
    for (const [offset, length] of [[chunk - 7, 20], [3, chunk * 2 + 9], [ragged.length - 100, 100], [0, 0]] as const) {
      assert.ok((await reader.read('ragged', offset, length)).equals(ragged.subarray(offset, offset + length)), `range ${offset}+${length}`);
    }
    assert.equal(reader.chunkIsZero('ragged', 2), true);
    assert.equal(reader.chunkIsZero('ragged', 0), false);
    assert.equal(point.disks.find((d) => d.name === 'allZero')!.storedChunks, 0);
  });
}

test('dedup: the same data twice is stored once; an unchanged second restore point adds no packs', async () => {
  await using dir = await tempDir();
  await initRepository(dir.path, { password: 'pw', encryption: true, chunkSizeBytes: chunk });
  await using repository = await openRepository(dir.path, { password: 'pw' });
  const unique = randomBytes(4 * chunk);
  const twice = Buffer.concat([unique, unique]);
  const writer = await repository.startBackup({ vmName: 'vm1' });
  const disk = writer.addDisk('vda', twice.length);
  for (let at = 0; at < twice.length; at += chunk) await disk.putChunk(at, Buffer.from(twice.subarray(at, at + chunk)));
  const first = await writer.commit();
  assert.equal(writer.stats.dedupBytes, 4 * chunk);
  assert.ok(writer.stats.storedBytes < 4 * chunk + 4096, `stored ${writer.stats.storedBytes} bytes for ${4 * chunk} unique`);
  const packsAfterFirst = await packCount(dir.path);

  const again = await backup(repository, 'vm1', { vda: twice });
  assert.equal(await packCount(dir.path), packsAfterFirst, 'no new pack');
  assert.equal(md5(await restoreAll(repository, again.id, 'vda')), md5(twice));

  // An incremental writes only changed chunks; unchanged ones come from the base.
  const changed = Buffer.from(twice);
  randomBytes(chunk).copy(changed, 5 * chunk);
  const incremental = await backup(repository, 'vm1', { vda: changed }, { base: first.id, onlyChunks: new Set([5]) });
  assert.equal(incremental.baseId, first.id);
  assert.equal(md5(await restoreAll(repository, incremental.id, 'vda')), md5(changed));
  assert.equal(md5(await restoreAll(repository, first.id, 'vda')), md5(twice));
});

test('the in-memory index holds many entries in at most 64 bytes each', () => {
  const index = new ChunkIndex();
  const ids: Buffer[] = [];
  for (let i = 0; i < 200_000; i++) {
    const id = randomBytes(32);
    ids.push(id);
    assert.equal(index.add(id, { packNo: i % 1000, offsetBytes: i, storedLength: i * 3, compressed: i % 2 === 0 }), true);
  }
  for (let i = 0; i < ids.length; i += 997) assert.deepEqual(index.get(ids[i]!), { packNo: i % 1000, offsetBytes: i, storedLength: i * 3, compressed: i % 2 === 0 });
  assert.equal(index.has(randomBytes(32)), false);
  assert.equal(index.size, 200_000);
  assert.ok(index.memoryBytes / index.size <= 64, `${index.memoryBytes / index.size} bytes per entry`);
});
