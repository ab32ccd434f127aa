import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { applyRetention, checkRepository, collectGarbage, forgetRestorePoints, initRepository, openRepository, type RestorePointSummary } from '../../src/repository/index.ts';
import { backup, md5, packCount, restoreAll, seededBytes, tempDir } from './helpers.ts';

const run = promisify(execFile);
const chunk = 256 * 1024;

function point(id: string, vmName: string, createdAt: string): RestorePointSummary {
  return { id, vmName, createdAt, disks: [], extra: {} };
}

test('retention keeps the last N and the newest of each day, week and month, per VM', () => {
  const points = [
    point('a1', 'a', '2024-01-01T10:00:00Z'), point('a2', 'a', '2024-01-15T10:00:00Z'), point('a3', 'a', '2024-02-01T10:00:00Z'),
    point('a4', 'a', '2024-02-01T18:00:00Z'), point('a5', 'a', '2024-02-02T09:00:00Z'), point('b1', 'b', '2024-01-01T00:00:00Z'),
  ];
  const kept = (policy: Parameters<typeof applyRetention>[1]) => applyRetention(points, policy).filter((d) => d.keep).map((d) => d.point.id).sort();
  assert.deepEqual(kept({ keepLast: 2 }), ['a4', 'a5', 'b1']);
  assert.deepEqual(kept({ keepDaily: 2 }), ['a4', 'a5', 'b1']);
  assert.deepEqual(kept({ keepMonthly: 2 }), ['a2', 'a5', 'b1']);
  assert.deepEqual(kept({ keepWeekly: 3 }), ['a2', 'a5', 'b1'].concat(['a1']).sort());
  assert.throws(() => applyRetention(points, {}), /refusing to forget everything/);
});

test('after forget and gc every kept point restores and space is reclaimed', async () => {
  await using dir = await tempDir();
  await initRepository(dir.path, { password: 'pw', encryption: true, chunkSizeBytes: chunk, packTargetBytes: 1024 * 1024 });
  await using repository = await openRepository(dir.path, { password: 'pw' });
  // Each backup shares half its chunks with the previous one, so gc has whole packs to delete and packs to repack.
  const disks: Buffer[] = [];
  const ids: string[] = [];
  for (let i = 0; i < 5; i++) {
    const disk = Buffer.concat([seededBytes(Buffer.alloc(32, 7), 0, 4 * chunk), seededBytes(Buffer.alloc(32, 8), i, 6 * chunk)]);
    disks.push(disk);
    ids.push((await backup(repository, 'vm1', { vda: disk })).id);
  }
  const other = seededBytes(Buffer.alloc(32, 9), 0, 3 * chunk);
  const otherId = (await backup(repository, 'vm2', { vda: other })).id;

  const dryRun = await forgetRestorePoints(repository, { keepLast: 2 }, { dryRun: true });
  assert.deepEqual(dryRun.filter((d) => !d.keep).map((d) => d.point.id).sort(), ids.slice(0, 3).sort());
  assert.equal((await repository.listRestorePoints()).length, 6, 'dry run changes nothing');

  // Through the CLI, as a user would.
  const { stdout } = await run('bin/snapshift', ['forget', '--repo', dir.path, '--keep-last', '2', '--vm', 'vm1'], { env: { ...process.env, SNAPSHIFT_PASSWORD: 'pw' } });
  assert.match(stdout, /3 restore point\(s\)\s+forgotten/);
  const packsBefore = await packCount(dir.path);
  const report = await collectGarbage(repository, { safetyWindowMs: 0 });
  assert.ok(report.bytesAfter < report.bytesBefore * 0.7, `reclaimed ${report.bytesBefore} -> ${report.bytesAfter}`);
  assert.ok((await packCount(dir.path)) < packsBefore);
  assert.deepEqual((await repository.listRestorePoints()).map((p) => p.id).sort(), [ids[3]!, ids[4]!, otherId].sort());
  assert.equal(md5(await restoreAll(repository, ids[3]!, 'vda')), md5(disks[3]!));
  assert.equal(md5(await restoreAll(repository, ids[4]!, 'vda')), md5(disks[4]!));
  assert.equal(md5(await restoreAll(repository, otherId, 'vda')), md5(other));
  const check = await checkRepository(repository, { readDataPercent: 100 });
  assert.deepEqual(check.problems, []);
  // A backup after gc dedupes against the rewritten index and still restores.
  const again = await backup(repository, 'vm1', { vda: disks[4]! });
  assert.equal(md5(await restoreAll(repository, again.id, 'vda')), md5(disks[4]!));
});

test('gc after a writer whose index write failed: the packs it left are garbage, and no later index file names them', async () => {
  await using dir = await tempDir();
  await initRepository(dir.path, { password: 'pw', encryption: true, chunkSizeBytes: chunk, packTargetBytes: 1 });
  await using repository = await openRepository(dir.path, { password: 'pw' });
  const kept = seededBytes(Buffer.alloc(32, 20), 0, 3 * chunk);
  const keptId = (await backup(repository, 'vm1', { vda: kept })).id;
  // A writer seals packs, then cannot write their index file (e.g. the disk filled up) and aborts.
  const writer = await repository.startBackup({ vmName: 'vm2' });
  const disk = writer.addDisk('vda', 4 * chunk);
  const lost = seededBytes(Buffer.alloc(32, 21), 0, 4 * chunk);
  for (let at = 0; at < lost.length; at += chunk) await disk.putChunk(at, Buffer.from(lost.subarray(at, at + chunk)));
  const writeIndexFile = repository.writeIndexFile.bind(repository);
  repository.writeIndexFile = () => Promise.reject(new Error('no space left (simulated)'));
  await assert.rejects(writer.commit(), /no space left \(simulated\)/);
  repository.writeIndexFile = writeIndexFile;

  await collectGarbage(repository, { safetyWindowMs: 0 });
  const next = seededBytes(Buffer.alloc(32, 22), 0, 2 * chunk);
  const nextId = (await backup(repository, 'vm3', { vda: next })).id;
  const check = await checkRepository(repository, { readDataPercent: 100 });
  assert.deepEqual([check.problems, check.warnings], [[], []]);
  assert.equal(md5(await restoreAll(repository, keptId, 'vda')), md5(kept));
  assert.equal(md5(await restoreAll(repository, nextId, 'vda')), md5(next));
});
