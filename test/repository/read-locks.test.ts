import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { exec } from '../../src/core/exec.ts';
import { initRepository, openRepository } from '../../src/repository/index.ts';
import { restoreDisk } from '../../src/restore/disk-restore.ts';
import { md5File, runCli } from '../support/workspace.ts';
import { backup, md5, mixedDisk, tempDir } from './helpers.ts';

const chunk = 256 * 1024;
const env = { SNAPSHIFT_PASSWORD: 'pw' };
const mounts: string[] = [];
const folders: string[] = [];
// Unmount before any folder is removed: a recursive remove must never walk into a live bind mount.
after(async () => {
  for (const mountPoint of mounts.splice(0).reverse()) await exec('umount', [mountPoint]).catch(() => undefined);
  for (const folder of folders.splice(0)) await rm(folder, { recursive: true, force: true });
});

test('a restore holds a shared lock while it reads: gc started meanwhile fails with REPO_LOCKED naming it, and succeeds after', async () => {
  await using dir = await tempDir();
  const repo = join(dir.path, 'repo');
  await initRepository(repo, { password: 'pw', encryption: true, chunkSizeBytes: chunk, packTargetBytes: 512 * 1024 });
  await using repository = await openRepository(repo, { password: 'pw' });
  const data = mixedDisk(12 * chunk + 5, chunk, 11);
  const point = await backup(repository, 'vm1', { vda: data });
  const target = join(dir.path, 'vda.raw');
  let gcDuringRestore: ReturnType<typeof spawnSync> | undefined;
  await restoreDisk(await repository.openRestorePoint(point.id), 'vda', target, {
    format: 'raw',
    force: false,
    chunkSizeBytes: chunk,
    readAhead: 1,
    onProgress: (doneBytes) => {
      // Mid-copy, with this process blocked: gc in another process must see our lock.
      if (doneBytes >= 2 * chunk && !gcDuringRestore) gcDuringRestore = spawnSync('bin/snapshift', ['gc', '--repo', repo, '--safety-window', '0'], { env: { ...process.env, ...env }, encoding: 'utf8' });
    },
  });
  assert.ok(gcDuringRestore, 'gc ran during the restore');
  assert.equal(gcDuringRestore.status, 2, `gc failed: ${String(gcDuringRestore.stdout)} ${String(gcDuringRestore.stderr)}`);
  assert.match(String(gcDuringRestore.stderr), new RegExp(`^snapshift: repository .*repo is locked \\(shared, restore of vm1\\) by host ${hostname()} pid ${process.pid} since `));
  assert.equal(await md5File(target), md5(data));
  assert.deepEqual(await readdir(join(repo, 'locks')), [], 'the restore released its lock');
  const gcAfter = await runCli(['gc', '--repo', repo, '--safety-window', '0'], env);
  assert.equal(gcAfter.status, 0, gcAfter.stderr);
});

test('a read-only repository (read-only bind mount) still restores and checks, with one warning line on stderr', { skip: process.getuid?.() !== 0 ? 'needs root for a read-only bind mount' : false }, async () => {
  const dir = { path: await mkdtemp(join(tmpdir(), 'snapshift-ro-test-')) };
  folders.push(dir.path);
  const repo = join(dir.path, 'repo');
  const readOnly = join(dir.path, 'repo-ro');
  const home = join(dir.path, 'home');
  await mkdir(readOnly);
  await mkdir(home);
  await initRepository(repo, { password: 'pw', encryption: true, chunkSizeBytes: chunk });
  const data = mixedDisk(9 * chunk + 3, chunk, 12);
  let pointId: string;
  {
    await using repository = await openRepository(repo, { password: 'pw' });
    pointId = (await backup(repository, 'vm1', { vda: data })).id;
  }
  await exec('mount', ['--bind', repo, readOnly]);
  mounts.push(readOnly);
  await exec('mount', ['-o', 'remount,ro,bind', readOnly]);
  const roEnv = { ...env, SNAPSHIFT_HOME: home };

  const target = join(dir.path, 'vda.raw');
  const restore = await runCli(['restore', 'vm1', '--repo', readOnly, '--point', pointId, '--to', target], roEnv);
  assert.equal(restore.status, 0, restore.stderr);
  const warning = /^snapshift: warning: repository .*repo-ro cannot be locked \(read-only file system\): reading it without a lock$/;
  assert.equal(restore.stderr.trim().split('\n').length, 1, restore.stderr);
  assert.match(restore.stderr.trim(), warning);
  assert.equal(await md5File(target), md5(data));

  const check = await runCli(['check', '--repo', readOnly, '--read-data'], roEnv);
  assert.equal(check.status, 0, check.stderr);
  assert.match(check.stdout, /^no errors in 1 restore point\(s\)/m);
  assert.equal(check.stderr.trim().split('\n').length, 1, check.stderr);
  assert.match(check.stderr.trim(), warning);

  // A gc holding an exclusive lock (written before the mount turned read-only, from another host) still wins.
  await exec('umount', [readOnly]);
  mounts.pop();
  const now = new Date().toISOString();
  await writeFile(join(repo, 'locks', 'elsewhere.json'), JSON.stringify({ kind: 'exclusive', host: 'backup-server-2', pid: 4242, purpose: 'gc', createdAt: now, refreshedAt: now }));
  await exec('mount', ['--bind', repo, readOnly]);
  mounts.push(readOnly);
  await exec('mount', ['-o', 'remount,ro,bind', readOnly]);
  const locked = await runCli(['restore', 'vm1', '--repo', readOnly, '--point', pointId, '--to', join(dir.path, 'again.raw')], roEnv);
  assert.equal(locked.status, 2);
  assert.match(locked.stderr, /is locked \(exclusive, gc\) by host backup-server-2 pid 4242/);
});
