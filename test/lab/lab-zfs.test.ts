import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Lab, zfsDaemonLabel } from '../../src/lab/index.ts';
import { readLabState } from '../../src/lab/lab-state.ts';
import { waitForExit } from '../../src/lab/owned-process.ts';
import { listZfsDatasets, zfsAnswers } from '../../src/storage/zfs/zfs-command.ts';
import { leftovers, snapshift } from './lab-leftovers.ts';

const MiB = 1024 ** 2;

async function labDir(): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'snapshift-zfs-'));
  after(async () => {
    await Lab.down(dir);
    await fs.rm(dir, { recursive: true, force: true });
  });
  return dir;
}

describe('lab ZFS datastore (zfs-fuse)', () => {
  test('a zfs-fuse the lab did not start is used, never ended; down removes exactly the lab pool', async () => {
    // One zfs-fuse per machine: start one ourselves (ended by PID below), unless one runs already.
    let foreignPid: number | undefined;
    if (!(await zfsAnswers())) {
      const child = spawn('zfs-fuse', ['-n', '--no-kstat-mount'], { detached: true, stdio: 'ignore' });
      foreignPid = child.pid;
      after(async () => {
        if (foreignPid && (await fs.access(`/proc/${foreignPid}`).then(() => true, () => false))) {
          process.kill(foreignPid, 'SIGTERM');
          await waitForExit(foreignPid, 20_000);
        }
      });
      for (let tries = 0; tries < 100 && !(await zfsAnswers()); tries++) await new Promise((resolve) => setTimeout(resolve, 100));
    }
    const dir = await labDir();
    const up = await snapshift(['lab', 'up', '--dir', dir, '--size', '512M', '--with-zfs']);
    assert.equal(up.code, 0, up.stderr);
    assert.match(up.stdout, /zfs +pool snapshift-lab-[0-9a-f]{8}/);
    const state = (await readLabState(path.join(dir, 'lab-state.json')))!;
    assert.ok(state.zfs);
    assert.deepEqual(state.processes.filter((p) => p.label === zfsDaemonLabel), [], 'a daemon the lab did not start is not recorded');
    assert.ok((await listZfsDatasets()).some((item) => item.name === state.zfs!.dataset));

    const down = await snapshift(['lab', 'down', '--dir', dir]);
    assert.equal(down.code, 0, down.stderr);
    assert.ok(await zfsAnswers(), 'the ZFS daemon still runs');
    assert.ok(!(await listZfsDatasets()).some((item) => item.name.startsWith(state.zfs!.poolName)), 'the lab pool is gone');
    assert.deepEqual(await leftovers(dir), { mounts: [], loops: [], livePids: [] });
  });

  test('after zfs-fuse is SIGKILLed, lab down still removes the dangling mounts and the pool file', async () => {
    if (await zfsAnswers()) {
      // Wait for the previous test's daemon to go, so this lab starts (and owns) its own.
      for (let tries = 0; tries < 200 && (await zfsAnswers()); tries++) await new Promise((resolve) => setTimeout(resolve, 100));
    }
    const dir = await labDir();
    const lab = await Lab.up({ dir, datastoreSizeBytes: 512 * MiB, zfs: true });
    const daemon = (await lab.state()).processes.find((p) => p.label === zfsDaemonLabel);
    assert.ok(daemon, 'the lab started zfs-fuse and recorded it');
    const zfs = await lab.zfs();
    await fs.writeFile(path.join(zfs.vmDisksDir, 'data'), Buffer.alloc(MiB, 1));
    process.kill(daemon.pid, 'SIGKILL');
    await waitForExit(daemon.pid, 10_000);
    assert.ok((await leftovers(dir)).mounts.includes(zfs.vmDisksDir), 'the dead daemon left its FUSE mounts');

    const report = await Lab.down(dir);
    assert.equal(report.removedZfsPool, zfs.poolName);
    assert.equal(report.zfsDaemon, 'gone');
    assert.deepEqual(await leftovers(dir, [daemon.pid]), { mounts: [], loops: [], livePids: [] });
    await assert.rejects(fs.access(path.join(dir, 'images', 'zfs.img')));
  });
});
