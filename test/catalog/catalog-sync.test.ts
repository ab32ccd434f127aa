import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { join } from 'node:path';
import { Catalog, restorePointRecordOf, type RestorePointRecord } from '../../src/catalog/index.ts';
import { initRepository, openRepository, type RestorePointSummary } from '../../src/repository/index.ts';
import { manifestPath } from '../../src/repository/repository.ts';
import { md5, mixedDisk } from '../repository/helpers.ts';
import { makeWorkspace, md5File, runCli } from '../support/workspace.ts';

const chunkSize = 256 * 1024;
let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
const path = (...parts: string[]) => join(workspace.dir, ...parts);
const repo = () => path('repo');
const disks = { vm1Old: mixedDisk(3 * 1024 * 1024, chunkSize, 1), vm1New: mixedDisk(3 * 1024 * 1024, chunkSize, 2), vm2: mixedDisk(2 * 1024 * 1024, chunkSize, 3) };
const points: { vm1Old?: RestorePointSummary; vm1New?: RestorePointSummary; vm2?: RestorePointSummary } = {};

/** A restore point written through the repository API with the `extra` a real backup writes. */
async function writePoint(repository: Awaited<ReturnType<typeof openRepository>>, vmName: string, data: Buffer, extra: Record<string, unknown>): Promise<RestorePointSummary> {
  const writer = await repository.startBackup({ vmName });
  const disk = writer.addDisk('vda', data.length);
  for (let at = 0; at < data.length; at += chunkSize) await disk.putChunk(at, Buffer.from(data.subarray(at, at + chunkSize)));
  const summary = await writer.commit(extra);
  await sleep(5); // distinct creation times: "latest" is well defined
  return summary;
}

/** What bin/snapshift sees: a home of its own, the password only in a file. */
function envWithHome(home: string): Record<string, string> {
  mkdirSync(home, { recursive: true });
  return { SNAPSHIFT_HOME: home, SNAPSHIFT_PASSWORD: '' };
}

before(async () => {
  workspace = await makeWorkspace('catsync');
  writeFileSync(path('password'), 'catalog-sync\n', { mode: 0o600 });
  await initRepository(repo(), { encryption: true, password: 'catalog-sync', chunkSizeBytes: chunkSize });
  await using repository = await openRepository(repo(), { password: 'catalog-sync' });
  const stats = (data: Buffer, mode: string) => ({ mode, processedBytes: data.length, transferredBytes: 1234, durationMs: 10 });
  points.vm1Old = await writePoint(repository, 'vm1', disks.vm1Old, { mode: 'regular', sessionId: 's1', stats: stats(disks.vm1Old, 'regular') });
  points.vm1New = await writePoint(repository, 'vm1', disks.vm1New, { mode: 'regular', sessionId: 's2', failoverReason: 'storage snapshot failed: test', stats: stats(disks.vm1New, 'regular') });
  points.vm2 = await writePoint(repository, 'vm2', disks.vm2, {
    mode: 'storage-snapshot',
    sessionId: 's3',
    storage: ['ceph-rbd'],
    stats: stats(disks.vm2, 'storage-snapshot'),
    rbdCbt: { disks: { vda: { image: 'rbd/vm2-disk', snapshot: 'snapshift-cbt-0123abcd', virtualSizeBytes: disks.vm2.length } } },
  });
});
after(async () => {
  await workspace?.cleanup();
});

test('a catalog lost with its host: catalog sync rebuilds it from the repository, and restore --point latest is bit-exact', async () => {
  const env = envWithHome(path('new-host'));
  const repoArgs = ['--repo', repo(), '--password-file', path('password')];
  const before = await runCli(['restore', 'vm1', '--point', 'latest', '--to', path('too-early.raw'), ...repoArgs], env);
  assert.equal(before.status, 2);
  assert.match(before.stderr, /no restore points for vm1 in the catalog \(a new or lost catalog\? run "snapshift catalog sync --repo PATH", or give --point ID\)/);

  const sync = await runCli(['catalog', 'sync', ...repoArgs, '--json'], env);
  assert.equal(sync.status, 0, sync.stderr);
  const report = JSON.parse(sync.stdout) as { repository: string; added: string[]; removed: string[]; unchanged: number; damaged: string[] };
  assert.equal(report.repository, repo());
  assert.deepEqual([...report.added].sort(), [points.vm1Old!.id, points.vm1New!.id, points.vm2!.id].sort());
  assert.deepEqual([report.removed, report.unchanged, report.damaged], [[], 0, []]);

  const listed = JSON.parse((await runCli(['restore-points', '--json'], env)).stdout) as RestorePointRecord[];
  assert.deepEqual(listed.map((point) => [point.vmName, point.id, point.mode, point.repositoryPath]), [
    ['vm1', points.vm1Old!.id, 'regular', repo()],
    ['vm1', points.vm1New!.id, 'regular', repo()],
    ['vm2', points.vm2!.id, 'storage-snapshot', repo()],
  ]);
  assert.equal(listed[1]!.createdAt, points.vm1New!.createdAt);
  assert.equal(listed[1]!.stats.processedBytes, disks.vm1New.length, 'statistics come from the manifest');
  assert.equal(listed[1]!.stats.failoverReason, 'storage snapshot failed: test');
  assert.deepEqual(listed[2]!.stats.storageKinds, ['ceph-rbd']);
  assert.deepEqual(listed[2]!.stats.retainedSnapshots, ['rbd/vm2-disk@snapshift-cbt-0123abcd'], 'the hunter keeps the retained RBD base of a synced restore point');

  const restored = await runCli(['restore', 'vm1', '--point', 'latest', '--to', path('vm1-latest.raw'), ...repoArgs], env);
  assert.equal(restored.status, 0, restored.stderr);
  assert.equal(await md5File(path('vm1-latest.raw')), md5(disks.vm1New));
  // The catalog now knows where vm1's restore points live: --repo may be left out.
  const withoutRepo = await runCli(['restore', 'vm2', '--point', 'latest', '--to', path('vm2-latest.raw'), '--password-file', path('password')], env);
  assert.equal(withoutRepo.status, 0, withoutRepo.stderr);
  assert.equal(await md5File(path('vm2-latest.raw')), md5(disks.vm2));

  const again = JSON.parse((await runCli(['catalog', 'sync', ...repoArgs, '--json'], env)).stdout) as typeof report;
  assert.deepEqual([again.added, again.removed, again.unchanged], [[], [], 3], 'a second sync changes nothing');
});

test('restore --point <id> needs no catalog at all', async () => {
  const env = envWithHome(path('no-sync-host'));
  const restored = await runCli(['restore', 'vm1', '--point', points.vm1Old!.id.slice(0, 10), '--to', path('vm1-old.raw'), '--repo', repo(), '--password-file', path('password')], env);
  assert.equal(restored.status, 0, restored.stderr);
  assert.equal(await md5File(path('vm1-old.raw')), md5(disks.vm1Old));
  using catalog = Catalog.open(path('no-sync-host'));
  assert.deepEqual(catalog.listRestorePoints(), []);
});

test('forget removes forgotten restore points from the catalog; sync drops rows whose manifest is gone and leaves other repositories alone', async () => {
  const home = path('forget-host');
  const env = envWithHome(home);
  const repoArgs = ['--repo', repo(), '--password-file', path('password')];
  assert.equal((await runCli(['catalog', 'sync', ...repoArgs], env)).status, 0);
  {
    using catalog = Catalog.open(home);
    catalog.addRestorePoint({ id: 'f'.repeat(32), vmName: 'vm9', repositoryPath: path('other-repo'), createdAt: new Date().toISOString(), mode: 'regular', stats: {} });
  }

  const dryRun = await runCli(['forget', ...repoArgs, '--vm', 'vm1', '--keep-last', '1', '--dry-run'], env);
  assert.equal(dryRun.status, 0, dryRun.stderr);
  const forget = await runCli(['forget', ...repoArgs, '--vm', 'vm1', '--keep-last', '1'], env);
  assert.equal(forget.status, 0, forget.stderr);
  {
    using catalog = Catalog.open(home);
    assert.deepEqual(catalog.listRestorePoints('vm1').map((point) => point.id), [points.vm1New!.id], 'the forgotten one left the catalog');
  }

  // Another host forgot vm2's restore point (here: its manifest removed by hand): sync notices.
  rmSync(join(repo(), manifestPath(points.vm2!.id)));
  const sync = await runCli(['catalog', 'sync', ...repoArgs], env);
  assert.equal(sync.status, 0, sync.stderr);
  assert.equal(sync.stdout, `catalog sync of ${repo()}: 0 added, 1 removed, 1 unchanged\n`);
  using catalog = Catalog.open(home);
  assert.deepEqual(catalog.listRestorePoints().map((point) => [point.vmName, point.id]), [
    ['vm1', points.vm1New!.id],
    ['vm9', 'f'.repeat(32)],
  ]);
});

test('the catalog row of a manifest keeps what a backup would have recorded', () => {
  const record = restorePointRecordOf({ id: 'a'.repeat(32), vmName: 'vm', createdAt: '2024-01-01T00:00:00.000Z', disks: [], extra: { test: true } }, '/r');
  assert.deepEqual(record, { id: 'a'.repeat(32), vmName: 'vm', repositoryPath: '/r', createdAt: '2024-01-01T00:00:00.000Z', mode: 'unknown', stats: {} });
});
