// docs/FORMAT.md § Locks: which operation takes which lock, and when a lock is stale.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdir, rm, utimes, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { checkRepository, collectGarbage, forgetRestorePoints, initRepository, openRepository, repairIndex, repositoryInfo } from '../../src/repository/index.ts';
import { backup, restoreAll, seededBytes, tempDir } from './helpers.ts';

const chunk = 256 * 1024;
const locked = (error: Error & { code?: string }): boolean => error.code === 'REPO_LOCKED';

async function writeLock(repo: string, name: string, record: { kind: 'shared' | 'exclusive'; host: string; pid: number; refreshedAt?: string }): Promise<void> {
  const now = new Date().toISOString();
  await writeFile(join(repo, 'locks', `${name}.json`), JSON.stringify({ purpose: 'test', createdAt: now, refreshedAt: now, ...record }));
}

test('the lock table: a shared lock blocks forget, gc (also --dry-run) and repair-index; an exclusive one blocks backup, restore and check', async () => {
  await using dir = await tempDir();
  await initRepository(dir.path, { encryption: false, chunkSizeBytes: chunk });
  await using repository = await openRepository(dir.path, {});
  const data = seededBytes(Buffer.alloc(32, 1), 0, 2 * chunk);
  const point = await backup(repository, 'vm1', { vda: data });

  await writeLock(dir.path, 'shared-elsewhere', { kind: 'shared', host: 'backup-server-2', pid: 4242 });
  await assert.rejects(collectGarbage(repository, { dryRun: true }), locked);
  await assert.rejects(collectGarbage(repository), locked);
  await assert.rejects(forgetRestorePoints(repository, { keepLast: 1 }), locked);
  await assert.rejects(repairIndex(repository), locked);
  assert.equal((await forgetRestorePoints(repository, { keepLast: 1 }, { dryRun: true })).length, 1, 'forget --dry-run takes no lock');
  assert.deepEqual((await checkRepository(repository)).problems, []);
  assert.ok((await restoreAll(repository, point.id, 'vda')).equals(data));
  await backup(repository, 'vm1', { vda: data });
  await rm(join(dir.path, 'locks', 'shared-elsewhere.json'));

  await writeLock(dir.path, 'exclusive-elsewhere', { kind: 'exclusive', host: 'backup-server-2', pid: 4242 });
  await assert.rejects(repository.startBackup({ vmName: 'vm1' }), locked);
  await assert.rejects(checkRepository(repository), locked);
  await assert.rejects(repository.lockForReading('restore of vm1'), locked);
  assert.equal((await repository.listRestorePoints()).length, 2, 'repo list takes no lock');
  assert.equal((await repositoryInfo(repository)).restorePoints, 2, 'repo info takes no lock');
  assert.deepEqual(await readdir(join(dir.path, 'locks')), ['exclusive-elsewhere.json'], 'a refused operation leaves no lock of its own');
});

test('stale locks: this host\'s only by a gone PID (never by age), another host\'s after 30 minutes without refresh, unreadable ones after 30 minutes', async () => {
  await using dir = await tempDir();
  await initRepository(dir.path, { encryption: false, chunkSizeBytes: chunk });
  await using repository = await openRepository(dir.path, {});
  const hourAgo = new Date(Date.now() - 60 * 60 * 1000).toISOString();

  // This host, a live node process (ours), last refreshed an hour ago: still held.
  await writeLock(dir.path, 'own-old', { kind: 'shared', host: hostname(), pid: process.pid, refreshedAt: hourAgo });
  await assert.rejects(collectGarbage(repository), locked);
  await rm(join(dir.path, 'locks', 'own-old.json'));

  // This host, a PID that does not run (beyond pid_max), refreshed just now: stale. Another host, an hour
  // without refresh: stale. A file that is not JSON: no conflict; removed once 30 minutes old.
  await writeLock(dir.path, 'own-dead', { kind: 'exclusive', host: hostname(), pid: 2 ** 22 + 1 });
  await writeLock(dir.path, 'elsewhere-old', { kind: 'exclusive', host: 'backup-server-2', pid: 4242, refreshedAt: hourAgo });
  await writeFile(join(dir.path, 'locks', 'garbled.json'), '{"kind": "exclu');
  await collectGarbage(repository);
  assert.deepEqual(await readdir(join(dir.path, 'locks')), ['garbled.json'], 'stale locks removed; a fresh unreadable one left');
  const old = new Date(Date.now() - 31 * 60 * 1000);
  await utimes(join(dir.path, 'locks', 'garbled.json'), old, old);
  await collectGarbage(repository);
  assert.deepEqual(await readdir(join(dir.path, 'locks')), []);
});
