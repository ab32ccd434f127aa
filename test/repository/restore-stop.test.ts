import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { chmod, mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { initRepository, openRepository } from '../../src/repository/index.ts';
import { restoreDisk } from '../../src/restore/disk-restore.ts';
import { pathExists } from '../../src/core/fs-probe.ts';
import { runCli } from '../support/workspace.ts';
import { backup, mixedDisk, tempDir } from './helpers.ts';

const chunk = 256 * 1024;

for (const format of ['raw', 'qcow2'] as const) test(`an aborted ${format} restore stops, removes its partial file and releases its lock`, async () => {
  await using dir = await tempDir();
  const repo = join(dir.path, 'repo');
  await initRepository(repo, { password: 'pw', encryption: true, chunkSizeBytes: chunk });
  await using repository = await openRepository(repo, { password: 'pw' });
  const point = await backup(repository, 'vm1', { vda: mixedDisk(12 * chunk, chunk, 3) });
  const controller = new AbortController();
  const target = join(dir.path, `vda.${format}`);
  await assert.rejects(
    restoreDisk(await repository.openRestorePoint(point.id), 'vda', target, {
      format,
      force: false,
      chunkSizeBytes: chunk,
      signal: controller.signal,
      onProgress: (doneBytes) => doneBytes >= 2 * chunk && controller.abort('test'),
    }),
    (error: Error & { code?: string }) => {
      assert.equal(error.code, 'RESTORE_STOPPED');
      assert.match(error.message, new RegExp(`^restore of disk vda to .*vda\\.${format} stopped \\(test\\); the partial file was removed$`));
      return true;
    },
  );
  assert.deepEqual((await readdir(dir.path)).sort(), ['repo']);
  assert.deepEqual(await readdir(join(repo, 'locks')), []);
});

for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  // qemu-img writes block devices and RBD images (files are our own writers'): an rbd: target runs the stub.
  test(`snapshift restore to rbd: stopped by ${signal} exits 3 and ends qemu-img; gc was refused while it ran`, async () => {
    await using dir = await tempDir();
    const repo = join(dir.path, 'repo');
    const home = join(dir.path, 'home');
    const stubs = join(dir.path, 'bin');
    await mkdir(home);
    await mkdir(stubs);
    await initRepository(repo, { encryption: false, chunkSizeBytes: chunk });
    let pointId: string;
    {
      await using repository = await openRepository(repo, {});
      pointId = (await backup(repository, 'vm1', { vda: mixedDisk(8 * chunk, chunk, 4) })).id;
    }
    // A qemu-img that converts forever: the restore is deterministically under way when the signal comes.
    await writeFile(join(stubs, 'qemu-img'), `#!/bin/sh\necho $$ > ${join(dir.path, 'qemu-img.pid')}\nexec sleep 120\n`);
    await chmod(join(stubs, 'qemu-img'), 0o755);
    const restore = spawn('bin/snapshift', ['restore', 'vm1', '--repo', repo, '--point', pointId, '--to', 'rbd:pool/vm1-restored'], {
      env: { ...process.env, SNAPSHIFT_HOME: home, PATH: `${stubs}:${process.env.PATH}` },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    restore.stderr.on('data', (data: Buffer) => (stderr += data.toString()));
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => restore.on('exit', (code, exitSignal) => resolve({ code, signal: exitSignal })));
    let qemuImgPid: number | undefined;
    try {
      while (!(await pathExists(join(dir.path, 'qemu-img.pid')))) await new Promise((resolve) => setTimeout(resolve, 20));
      const converterPid = Number((await readFile(join(dir.path, 'qemu-img.pid'), 'utf8')).trim());
      qemuImgPid = converterPid;
      const gc = await runCli(['gc', '--repo', repo, '--safety-window', '0']);
      assert.equal(gc.status, 2, gc.stdout);
      assert.match(gc.stderr, new RegExp(`is locked \\(shared, restore of vm1\\) by host .* pid ${restore.pid} since`));

      restore.kill(signal);
      const exit = await exited;
      assert.deepEqual(exit, { code: 3, signal: null }, stderr);
      assert.match(stderr, new RegExp(`snapshift: ${signal}: stopping cleanly \\(the partial file is removed\\)`));
      assert.match(stderr, /snapshift: restore of disk vda to rbd:pool\/vm1-restored stopped \(SIG(TERM|INT) received\); the target holds a partly written disk/);
      assert.throws(() => process.kill(converterPid, 0), /ESRCH/, 'qemu-img was ended');
      assert.deepEqual(await readdir(join(repo, 'locks')), [], 'lock released');
    } finally {
      // Whatever failed, no child of this test outlives it (the stub would sleep on as an orphan).
      restore.kill('SIGKILL');
      if (qemuImgPid !== undefined) {
        try {
          process.kill(qemuImgPid, 'SIGKILL');
        } catch {
          // already gone, as it should be
        }
      }
    }
  });
}
