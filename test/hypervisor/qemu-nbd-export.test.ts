// Read-only exports from a QEMU process that runs no NBD server of its own (a VM): the first export starts
// one on our socket, and every later export of the same task shares it. Disposing one export must leave the
// others readable (QEMU's nbd-server-stop closes every NBD export of the process), and the server goes
// with the last one.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { exec } from '../../src/core/exec.ts';
import { NbdClient } from '../../src/datamover/nbd/index.ts';
import { exportNodeReadOnly } from '../../src/hypervisor/qemu/qemu-nbd-export.ts';
import { QmpClient } from '../../src/hypervisor/qemu/qmp-client.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { makeWorkspace } from '../support/workspace.ts';

const MiB = 1024 * 1024;

describe('read-only exports sharing the NBD server we start', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let daemon: StorageDaemon;
  let qmp: QmpClient;

  before(async () => {
    workspace = await makeWorkspace('nbd-export');
    const images = [0, 1].map((index) => join(workspace.dir, `disk${index}.qcow2`));
    for (const path of images) await exec('qemu-img', ['create', '-q', '-f', 'qcow2', path, String(4 * MiB)]);
    daemon = await StorageDaemon.start({ dir: workspace.dir, images: images.map((path) => ({ path, format: 'qcow2' as const })), noNbdServer: true });
    qmp = await QmpClient.connect(daemon.qmpSocketPath);
  });

  after(async () => {
    await qmp?.close();
    await daemon?.stop();
    await workspace?.cleanup();
  });

  const exportIds = async (): Promise<string[]> => (await qmp.execute<Array<{ id: string }>>('query-block-exports')).map((entry) => entry.id).sort();

  test('disposing the first of two exports leaves the second readable; the last one stops the server', async () => {
    const socketPath = join(workspace.dir, 'ours.sock');
    const first = await exportNodeReadOnly(qmp, 'disk0', { socketPath, exportName: 'first' });
    const second = await exportNodeReadOnly(qmp, 'disk1', { socketPath, exportName: 'second' });
    assert.deepEqual(await exportIds(), ['first-export', 'second-export']);

    await first[Symbol.asyncDispose]();
    assert.deepEqual(await exportIds(), ['second-export'], 'the second export is still there');
    {
      await using nbd = await NbdClient.connect({ socketPath: second.socketPath, exportName: second.exportName });
      assert.equal((await nbd.read(0, MiB)).length, MiB, 'and readable');
    }

    await second[Symbol.asyncDispose]();
    assert.deepEqual(await exportIds(), []);
    assert.equal(existsSync(socketPath), false, 'the server went with the last export');
    // No server runs any more: starting one succeeds.
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: socketPath } } });
    await qmp.execute('nbd-server-stop');
  });

  test('disposal in the other order, and an export added after one was disposed, share the server too', async () => {
    const socketPath = join(workspace.dir, 'ours.sock');
    const first = await exportNodeReadOnly(qmp, 'disk0', { socketPath, exportName: 'first' });
    const second = await exportNodeReadOnly(qmp, 'disk1', { socketPath, exportName: 'second' });
    await second[Symbol.asyncDispose]();
    const third = await exportNodeReadOnly(qmp, 'disk1', { socketPath, exportName: 'third' });
    await first[Symbol.asyncDispose]();
    {
      await using nbd = await NbdClient.connect({ socketPath: third.socketPath, exportName: third.exportName });
      assert.equal((await nbd.read(0, MiB)).length, MiB, 'the third export is readable after the first went');
    }
    await third[Symbol.asyncDispose]();
    assert.deepEqual(await exportIds(), []);
    assert.equal(existsSync(socketPath), false);
  });
});
