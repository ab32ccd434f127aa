import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { checkRepository, collectGarbage, initRepository, openRepository } from '../../src/repository/index.ts';
import { decodeIndexFile, encodeIndexFile, encodePackTrailer, readPackTail } from '../../src/repository/pack-format.ts';
import { backup, md5, restoreAll, seededBytes, tempDir } from './helpers.ts';

const chunk = 256 * 1024;

async function filesUnder(root: string, folder: string): Promise<string[]> {
  const result: string[] = [];
  for (const entry of await readdir(join(root, folder), { withFileTypes: true, recursive: true })) if (entry.isFile()) result.push(join(entry.parentPath ?? entry.path, entry.name).slice(root.length + 1));
  return result.sort();
}

/** Two restore points, several packs of a few blobs each, compressible and incompressible chunks. */
async function filledRepository(path: string): Promise<{ a: string; b: string }> {
  await initRepository(path, { password: 'pw', encryption: true, chunkSizeBytes: chunk, packTargetBytes: 3 * chunk });
  await using repository = await openRepository(path, { password: 'pw' });
  const a = await backup(repository, 'vm-a', { vda: Buffer.concat([seededBytes(Buffer.alloc(32, 1), 0, 4 * chunk), Buffer.alloc(2 * chunk, 'text a ')]) });
  const b = await backup(repository, 'vm-b', { vda: Buffer.concat([seededBytes(Buffer.alloc(32, 2), 0, 3 * chunk), Buffer.alloc(chunk, 'text b ')]) });
  return { a: a.id, b: b.id };
}

test('check compares every index entry with its pack trailer: a re-encoded index file with a wrong offset, a trailer with a wrong flag, a missing pack', async () => {
  await using dir = await tempDir();
  const points = await filledRepository(dir.path);
  {
    await using repository = await openRepository(dir.path, { password: 'pw' });
    const clean = await checkRepository(repository);
    assert.deepEqual([clean.problems, clean.warnings], [[], []]);
  }

  // 1. An index file re-encoded (valid seal, right length) with one entry's offset moved by 16 bytes.
  await using repository = await openRepository(dir.path, { password: 'pw' });
  const indexName = (await filesUnder(dir.path, 'index'))[0]!;
  const content = decodeIndexFile(repository.keys, await readFile(join(dir.path, indexName)), indexName);
  const target = content.packs[0]!;
  const moved = target.blobs.at(-1)!;
  const movedId = moved.id.toString('hex');
  const originalOffset = moved.offsetBytes;
  moved.offsetBytes += 16;
  await writeFile(join(dir.path, indexName), encodeIndexFile(repository.keys, content));
  const movedPack = `data/${target.packId.slice(0, 2)}/${target.packId}`;

  // 2. A pack trailer re-sealed with one blob's compression flag flipped (the blobs untouched).
  const otherPackId = content.packs.length > 1 ? content.packs[1]!.packId : (await filesUnder(dir.path, 'data')).map((n) => n.split('/').at(-1)!).find((id) => id !== target.packId)!;
  const otherPack = `data/${otherPackId.slice(0, 2)}/${otherPackId}`;
  const packBytes = await readFile(join(dir.path, otherPack));
  const tail = await readPackTail(repository.keys, otherPack, packBytes.length, async (o, l) => packBytes.subarray(o, o + l));
  const flipped = tail.blobs[0]!;
  flipped.compressed = !flipped.compressed;
  await writeFile(join(dir.path, otherPack), Buffer.concat([packBytes.subarray(0, tail.trailerOffsetBytes), encodePackTrailer(repository.keys, tail.blobs)]));

  const report = await checkRepository(repository);
  const mismatches = report.problems.filter((p) => p.kind === 'index-mismatch');
  assert.equal(mismatches.length, 2, JSON.stringify(report.problems, null, 1));
  const byChunk = new Map(mismatches.map((p) => [p.chunkId, p]));
  const offsetProblem = byChunk.get(movedId)!;
  assert.equal(offsetProblem.pack, movedPack);
  assert.match(offsetProblem.message, new RegExp(`index file ${indexName} and the trailer of pack ${movedPack} disagree on chunk ${movedId}: offset ${originalOffset + 16} in the index, ${originalOffset} in the trailer`));
  assert.ok(offsetProblem.restorePoints.length === 1 && Object.values(points).includes(offsetProblem.restorePoints[0]!), 'names the restore point that uses the chunk');
  const flagProblem = byChunk.get(flipped.id.toString('hex'))!;
  assert.equal(flagProblem.pack, otherPack);
  assert.match(flagProblem.message, new RegExp(`${flipped.compressed ? 'not compressed' : 'compressed'} in the index, ${flipped.compressed ? 'compressed' : 'not compressed'} in the trailer`));
  assert.equal(report.problems.length, 2, 'nothing else is reported');

  // 3. A pack the index lists is gone.
  await rm(join(dir.path, otherPack));
  const missing = await checkRepository(repository);
  assert.deepEqual(missing.problems.filter((p) => p.kind === 'pack-missing').map((p) => p.pack), [otherPack]);
  assert.ok(missing.problems.some((p) => p.kind === 'chunk-missing'), 'its referenced chunks are named');
  assert.ok(!missing.problems.some((p) => p.kind === 'index-mismatch' && p.pack === otherPack), 'a missing pack is not also a mismatch');
});

test('gc keeps a pack with an unreferenced blob and indexes only the referenced ones: the trailer lists more, check is clean', async () => {
  await using dir = await tempDir();
  await initRepository(dir.path, { password: 'pw', encryption: true, chunkSizeBytes: chunk, packTargetBytes: 4 * chunk });
  await using repository = await openRepository(dir.path, { password: 'pw' });
  const four = seededBytes(Buffer.alloc(32, 5), 0, 4 * chunk);
  const first = await backup(repository, 'vm1', { vda: four });
  const kept = await backup(repository, 'vm1', { vda: Buffer.from(four.subarray(0, 3 * chunk)) });
  assert.equal((await filesUnder(dir.path, 'data')).length, 1, 'one pack of four blobs');
  await rm(join(dir.path, 'manifests', first.id)); // as forget would
  const report = await collectGarbage(repository, { safetyWindowMs: 0 });
  assert.deepEqual([report.packsDeleted, report.packsRepacked], [0, 0], 'a quarter unreferenced: the pack is kept as it is');

  const [packName] = await filesUnder(dir.path, 'data');
  const packBytes = await readFile(join(dir.path, packName!));
  const trailer = (await readPackTail(repository.keys, packName!, packBytes.length, async (o, l) => packBytes.subarray(o, o + l))).blobs;
  const indexFiles = await filesUnder(dir.path, 'index');
  assert.equal(indexFiles.length, 1);
  const indexed = decodeIndexFile(repository.keys, await readFile(join(dir.path, indexFiles[0]!)), indexFiles[0]!).packs.flatMap((p) => p.blobs);
  assert.deepEqual([trailer.length, indexed.length], [4, 3], 'the trailer lists the dead blob, gc\'s index does not');
  assert.ok(indexed.every((blob) => blob.rawLength === 0), 'gc does not record raw lengths of kept packs');

  const check = await checkRepository(repository, { readDataPercent: 100 });
  assert.deepEqual([check.problems, check.warnings], [[], []]);
  assert.equal(md5(await restoreAll(repository, kept.id, 'vda')), md5(four.subarray(0, 3 * chunk)));

  // A file in data/ that is not at data/<first 2 hex of its name>/<name> is no pack to any reader.
  const stray = `data/00/${'f'.repeat(64)}`;
  await mkdir(join(dir.path, 'data', '00'), { recursive: true });
  await writeFile(join(dir.path, stray), packBytes);
  const strayCheck = await checkRepository(repository);
  assert.deepEqual(strayCheck.problems, []);
  assert.deepEqual(strayCheck.warnings, [`${stray} is not where a pack is stored (data/<first 2 hex digits of the pack id>/<64 hex digits>): no reader sees it`]);
});
