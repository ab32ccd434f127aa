import type { RepairIndexReport } from '../../src/repository/repair-index.ts';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdir, readFile, rm, writeFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { checkRepository, initRepository, openRepository } from '../../src/repository/index.ts';
import { runCli } from '../support/workspace.ts';
import { backup, md5, mixedDisk, restoreAll, seededBytes, tempDir } from './helpers.ts';

const chunk = 256 * 1024;
const env = { SNAPSHIFT_PASSWORD: 'pw' };

async function filesUnder(root: string, folder: string): Promise<string[]> {
  const result: string[] = [];
  for (const entry of await readdir(join(root, folder), { withFileTypes: true, recursive: true })) if (entry.isFile()) result.push(join(entry.parentPath ?? entry.path, entry.name).slice(root.length + 1));
  return result.sort();
}

async function flipByte(path: string, offsetFromEnd: number): Promise<void> {
  const bytes = await readFile(path);
  bytes[bytes.length - offsetFromEnd] = bytes[bytes.length - offsetFromEnd]! ^ 0x55;
  await writeFile(path, bytes);
}

/** What `repo repair-index --json` prints. */
type RepairReport = RepairIndexReport;

/** Three restore points over several packs and index files. */
async function filledRepository(path: string): Promise<Map<string, Buffer>> {
  await initRepository(path, { password: 'pw', encryption: true, chunkSizeBytes: chunk, packTargetBytes: 512 * 1024 });
  await using repository = await openRepository(path, { password: 'pw' });
  const disks = new Map<string, Buffer>();
  for (const seed of [1, 2, 3]) {
    const data = Buffer.concat([mixedDisk(6 * chunk, chunk, seed), seededBytes(Buffer.alloc(32, seed), 0, 2 * chunk + 100)]);
    disks.set((await backup(repository, `vm${seed}`, { vda: data })).id, data);
  }
  return disks;
}

test('repo repair-index rebuilds a deleted and a damaged index from the pack trailers: check clean, restores bit-exact', async () => {
  await using dir = await tempDir();
  const disks = await filledRepository(dir.path);
  const oldIndexFiles = await filesUnder(dir.path, 'index');
  assert.ok(oldIndexFiles.length >= 3, `index files: ${oldIndexFiles.join(', ')}`);
  await rm(join(dir.path, oldIndexFiles[0]!));
  await flipByte(join(dir.path, oldIndexFiles[1]!), 30);
  {
    await using repository = await openRepository(dir.path, { password: 'pw' });
    assert.notDeepEqual((await checkRepository(repository)).problems, [], 'the damage shows before the repair');
  }

  const repair = await runCli(['repo', 'repair-index', '--repo', dir.path, '--json'], env);
  assert.equal(repair.status, 0, repair.stderr);
  const report = JSON.parse(repair.stdout) as RepairReport;
  const packs = await filesUnder(dir.path, 'data');
  assert.equal(report.packsRead, packs.length);
  assert.equal(report.packsIndexed, packs.length);
  assert.deepEqual(report.damagedPacks, []);
  assert.equal(report.indexFilesRemoved, oldIndexFiles.length - 1, 'every old index file that was still there');
  const newIndexFiles = await filesUnder(dir.path, 'index');
  assert.equal(newIndexFiles.length, report.indexFilesWritten);
  assert.ok(newIndexFiles.every((name) => !oldIndexFiles.includes(name)), 'only new index files remain');
  assert.deepEqual(await filesUnder(dir.path, 'locks'), [], 'the exclusive lock is gone');

  const plain = await runCli(['repo', 'repair-index', '--repo', dir.path], env);
  assert.equal(plain.status, 0, plain.stderr);
  assert.match(plain.stdout, new RegExp(`read ${packs.length} pack\\(s\\): indexed ${packs.length} pack\\(s\\), ${report.chunksIndexed} chunk\\(s\\) in \\d+ new index file\\(s\\); removed ${newIndexFiles.length} old index file\\(s\\)`));

  await using repository = await openRepository(dir.path, { password: 'pw' });
  const check = await checkRepository(repository, { readDataPercent: 100 });
  assert.deepEqual([check.problems, check.warnings], [[], []]);
  for (const [id, data] of disks) assert.equal(md5(await restoreAll(repository, id, 'vda')), md5(data), `restore point ${id}`);
});

test('repo repair-index reports a pack whose trailer cannot be read and leaves it in place (its chunks kept from the old index)', async () => {
  await using dir = await tempDir();
  const disks = await filledRepository(dir.path);
  const packs = await filesUnder(dir.path, 'data');
  const damaged = packs[0]!;
  const sizeBefore = (await stat(join(dir.path, damaged))).size;
  await flipByte(join(dir.path, damaged), 20); // inside the sealed trailer

  const repair = await runCli(['repo', 'repair-index', '--repo', dir.path, '--json'], env);
  assert.equal(repair.status, 1, `exit 1: a warning (${repair.stderr})`);
  const report = JSON.parse(repair.stdout) as RepairReport;
  assert.equal(report.packsRead, packs.length);
  assert.equal(report.packsIndexed, packs.length, 'the damaged pack keeps the entries an old index file had for it');
  assert.equal(report.damagedPacks.length, 1);
  assert.equal(report.damagedPacks[0]!.pack, damaged);
  assert.match(report.damagedPacks[0]!.reason, /trailer of pack .* is damaged/);
  assert.equal(report.damagedPacks[0]!.keptFromOldIndex, true);
  assert.equal((await stat(join(dir.path, damaged))).size, sizeBefore, 'not deleted, not changed');

  const plain = await runCli(['repo', 'repair-index', '--repo', dir.path], env);
  assert.equal(plain.status, 1);
  assert.match(plain.stdout, new RegExp(`warning: the trailer of pack ${damaged} cannot be read .*; the pack is left in place, its chunks are indexed from the old index`));

  // The blobs themselves are intact: every restore point still restores; check names only the trailer.
  await using repository = await openRepository(dir.path, { password: 'pw' });
  for (const [id, data] of disks) assert.equal(md5(await restoreAll(repository, id, 'vda')), md5(data), `restore point ${id}`);
  const check = await checkRepository(repository, { readDataPercent: 100 });
  assert.deepEqual(check.problems.map((p) => [p.kind, p.pack]), [['pack-damaged', damaged]]);
});
