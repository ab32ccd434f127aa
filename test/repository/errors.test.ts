import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { exec } from '../../src/core/exec.ts';
import { initRepository, openRepository } from '../../src/repository/index.ts';
import { backup, md5, mixedDisk, restoreAll, seededBytes, tempDir } from './helpers.ts';

const run = promisify(execFile);
const chunk = 256 * 1024;

/** Runs the CLI and expects exit 2 with one line on stderr matching `pattern`. */
async function failsWithOneLine(args: string[], env: Record<string, string>, pattern: RegExp): Promise<void> {
  await assert.rejects(run('bin/snapshift', args, { env: { ...process.env, ...env } }), (error: { code?: number; stderr?: string }) => {
    assert.equal(error.code, 2, `exit status of ${args.join(' ')}`);
    const lines = (error.stderr ?? '').trim().split('\n');
    assert.equal(lines.length, 1, `one line: ${error.stderr}`);
    assert.match(lines[0]!, pattern);
    return true;
  });
}

test('wrong password, missing repository and a future format version: one clear line each, exit 2', async () => {
  await using dir = await tempDir();
  const repo = join(dir.path, 'repo');
  await run('bin/snapshift', ['repo', 'init', repo, '--chunk-size', '256K'], { env: { ...process.env, SNAPSHIFT_PASSWORD: 'right' } });
  await failsWithOneLine(['repo', 'info', '--repo', repo], { SNAPSHIFT_PASSWORD: 'wrong' }, /^snapshift: wrong password for repository .*repo \(no key slot opened\)$/);
  await failsWithOneLine(['repo', 'info', '--repo', join(dir.path, 'nothing-here')], { SNAPSHIFT_PASSWORD: 'right' }, /^snapshift: no repository at .*nothing-here/);
  await failsWithOneLine(['repo', 'info', '--repo', repo], { SNAPSHIFT_PASSWORD: '' }, /a password is needed/);
  const config = JSON.parse(await readFile(join(repo, 'config'), 'utf8')) as Record<string, unknown>;
  await writeFile(join(repo, 'config'), JSON.stringify({ ...config, version: 2 }));
  await failsWithOneLine(['repo', 'info', '--repo', repo], { SNAPSHIFT_PASSWORD: 'right' }, /format version 2; this snapshift reads version 1 only/);
  await writeFile(join(repo, 'config'), JSON.stringify(config));
  const { stdout } = await run('bin/snapshift', ['repo', 'info', '--repo', repo, '--json'], { env: { ...process.env, SNAPSHIFT_PASSWORD: 'right' } });
  assert.equal((JSON.parse(stdout) as { version: number }).version, 1, 'nothing lost');
});

test('a full disk fails the backup with one clear error; earlier restore points are intact', { skip: process.getuid?.() !== 0 ? 'needs root for a loop mount' : false }, async () => {
  await using dir = await tempDir();
  const image = join(dir.path, 'small.img');
  const mountPoint = join(dir.path, 'mnt');
  await mkdir(mountPoint);
  await exec('truncate', ['-s', '24M', image]);
  await exec('mkfs.ext4', ['-q', '-F', '-m', '0', image]);
  await exec('mount', ['-o', 'loop', image, mountPoint]);
  try {
    const repo = join(mountPoint, 'repo');
    await initRepository(repo, { password: 'pw', encryption: true, chunkSizeBytes: chunk, compression: 'none', packTargetBytes: 4 * 1024 * 1024 });
    const first = mixedDisk(8 * chunk, chunk, 5);
    let firstId: string;
    {
      await using repository = await openRepository(repo, { password: 'pw' });
      firstId = (await backup(repository, 'vm1', { vda: first })).id;
      const tooBig = seededBytes(Buffer.alloc(32, 9), 0, 40 * 1024 * 1024);
      await assert.rejects(backup(repository, 'vm1', { vda: tooBig }), (error: Error & { code?: string }) => {
        assert.equal(error.code, 'REPO_DISK_FULL');
        assert.match(error.message, /^no space left on the file system of repository .*; nothing was committed, earlier restore points are intact/);
        return true;
      });
    }
    await using repository = await openRepository(repo, { password: 'pw' });
    assert.deepEqual((await repository.listRestorePoints()).map((p) => p.id), [firstId]);
    assert.equal(md5(await restoreAll(repository, firstId, 'vda')), md5(first));
  } finally {
    await exec('umount', [mountPoint]);
  }
});
