import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { checkRepository, initRepository, openRepository } from '../../src/repository/index.ts';
import { backup, md5, mixedDisk, restoreAll, seededBytes, tempDir } from './helpers.ts';

const chunk = 256 * 1024;

async function flipByte(path: string, offset: number): Promise<void> {
  const bytes = await readFile(path);
  bytes[offset] = bytes[offset]! ^ 0x55;
  await writeFile(path, bytes);
}

async function files(root: string, folder: string): Promise<string[]> {
  const result: string[] = [];
  for (const entry of await readdir(join(root, folder), { withFileTypes: true, recursive: true })) if (entry.isFile()) result.push(join(entry.parentPath ?? entry.path, entry.name));
  return result;
}

test('a flipped byte in a pack, an index and a manifest: check names each, restore fails only where affected', async () => {
  await using dir = await tempDir();
  // One blob per pack, so damage to one pack hits exactly one chunk.
  await initRepository(dir.path, { password: 'pw', encryption: true, chunkSizeBytes: chunk, packTargetBytes: 1 });
  const dataA = seededBytes(Buffer.alloc(32, 1), 0, 3 * chunk);
  const dataB = mixedDisk(4 * chunk, chunk, 7);
  const dataC = seededBytes(Buffer.alloc(32, 3), 0, 2 * chunk);
  let ids: { a: string; b: string; c: string };
  {
    await using repository = await openRepository(dir.path, { password: 'pw' });
    const a = await backup(repository, 'vm-a', { vda: dataA });
    const b = await backup(repository, 'vm-b', { vda: dataB });
    const c = await backup(repository, 'vm-c', { vda: dataC });
    ids = { a: a.id, b: b.id, c: c.id };
  }
  // Damage: the pack holding A's chunk 1, one index file, C's manifest.
  const reader = await (async () => {
    await using repository = await openRepository(dir.path, { password: 'pw' });
    const point = await repository.openRestorePoint(ids.a);
    const id = point.mapOf('vda')!.subarray(32, 64);
    const location = repository.index.get(id)!;
    return { chunkId: id.toString('hex'), pack: repository.packPathOf(location.packNo), offset: location.offsetBytes + 40 };
  })();
  await flipByte(join(dir.path, reader.pack), reader.offset);
  const indexFile = (await files(dir.path, 'index'))[0]!;
  await flipByte(indexFile, 30);
  await flipByte(join(dir.path, 'manifests', ids.c), 40);

  await using repository = await openRepository(dir.path, { password: 'pw' });
  const report = await checkRepository(repository, { readDataPercent: 100 });
  const byKind = (kind: string) => report.problems.filter((p) => p.kind === kind);
  assert.equal(byKind('chunk-damaged').length, 1, JSON.stringify(report.problems, null, 1));
  const damagedChunk = byKind('chunk-damaged')[0]!;
  assert.equal(damagedChunk.chunkId, reader.chunkId);
  assert.deepEqual(damagedChunk.restorePoints, [ids.a]);
  assert.match(damagedChunk.message, new RegExp(`chunk ${reader.chunkId} in pack ${reader.pack} is damaged.*restore point\\(s\\) ${ids.a}`));
  assert.equal(byKind('index-damaged').length, 1);
  assert.match(byKind('index-damaged')[0]!.message, /index file index\/[0-9a-f]{64} is damaged/);
  assert.equal(byKind('manifest-damaged').length, 1);
  assert.match(byKind('manifest-damaged')[0]!.message, new RegExp(`manifest of restore point ${ids.c} is damaged`));
  assert.equal(report.problems.length, 3);

  await assert.rejects(restoreAll(repository, ids.a, 'vda'), (error: Error & { code?: string }) => {
    assert.equal(error.code, 'REPO_CHUNK_DAMAGED');
    assert.match(error.message, new RegExp(`chunk ${reader.chunkId} .*in pack ${reader.pack} is damaged`));
    return true;
  });
  await assert.rejects(repository.openRestorePoint(ids.c), /manifest of restore point [0-9a-f]{32} is damaged/);
  // Unaffected: B restores although an index file is damaged (its packs are read from their trailers).
  assert.equal(md5(await restoreAll(repository, ids.b, 'vda')), md5(dataB));
  // The readable chunks of A still read.
  assert.ok((await (await repository.openRestorePoint(ids.a)).read('vda', 0, chunk)).equals(dataA.subarray(0, chunk)));
});
