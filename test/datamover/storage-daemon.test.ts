import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { exec } from '../../src/core/exec.ts';
import { SnapshiftError } from '../../src/core/errors.ts';
import { NbdClient } from '../../src/datamover/nbd/index.ts';
import { QmpClient } from '../../src/hypervisor/qemu/qmp-client.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { randomBytes, startWriter, writePattern, writeRandom } from '../../src/lab/nbd-writer.ts';

const MiB = 1024 * 1024;

function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function hashExport(socketPath: string, exportName: string): Promise<string> {
  await using nbd = await NbdClient.connect({ socketPath, exportName });
  const hash = createHash('sha256');
  const buffer = Buffer.allocUnsafe(4 * MiB);
  for (let offset = 0; offset < nbd.sizeBytes; offset += buffer.length) {
    const piece = buffer.subarray(0, Math.min(buffer.length, nbd.sizeBytes - offset));
    await nbd.readInto(offset, piece);
    hash.update(piece);
  }
  return hash.digest('hex');
}

interface BitmapInfo {
  name: string;
  flags: string[];
}

async function qcow2Bitmaps(path: string): Promise<BitmapInfo[]> {
  const { stdout } = await exec('qemu-img', ['info', '-U', '--output=json', path]);
  const info = JSON.parse(stdout) as { 'format-specific'?: { data?: { bitmaps?: BitmapInfo[] } } };
  return info['format-specific']?.data?.bitmaps ?? [];
}

describe('StorageDaemon: a guest-less disk', () => {
  let dir: string;
  let daemon: StorageDaemon;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'snapshift-qsd-'));
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'system.qcow2'), '64M']);
    await exec('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'data.raw'), '8M']);
    daemon = await StorageDaemon.start({
      dir,
      images: [
        { path: join(dir, 'system.qcow2'), format: 'qcow2' },
        { path: join(dir, 'data.raw'), format: 'raw', nodeName: 'data', exportName: 'vdb' },
      ],
    });
  });

  after(async () => {
    await daemon?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  test('runs with one writable export per image and answers QMP', async () => {
    assert.ok(processExists(daemon.pid));
    assert.deepEqual(
      daemon.disks.map((disk) => [disk.nodeName, disk.fileNodeName, disk.exportName]),
      [
        ['disk0', 'disk0-file', 'disk0'],
        ['data', 'data-file', 'vdb'],
      ],
    );
    await using qmp = await QmpClient.connect(daemon.qmpSocketPath);
    const nodes = await qmp.execute<Array<{ 'node-name': string; drv: string }>>('query-named-block-nodes', { flat: true });
    assert.deepEqual(nodes.map((node) => `${node['node-name']}:${node.drv}`).sort(), ['data-file:file', 'data:raw', 'disk0-file:file', 'disk0:qcow2']);
    const exports = await qmp.execute<Array<{ id: string; 'node-name': string }>>('query-block-exports');
    assert.deepEqual(exports.map((e) => `${e.id}:${e['node-name']}`).sort(), ['data-export:data', 'disk0-export:disk0']);
  });

  test('data written through NBD like a guest reads back, deterministic random data included', async () => {
    {
      await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
      await writePattern(nbd, 2 * MiB, MiB, 0x42);
      await writeRandom(nbd, 7 * MiB + 512, 3 * MiB, 1234);
      await nbd.flush();
    }
    await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
    assert.ok((await nbd.read(2 * MiB, MiB)).every((byte) => byte === 0x42));
    const random = await nbd.read(7 * MiB + 512, 3 * MiB);
    assert.ok(random.equals(randomBytes(1234, 7 * MiB + 512, 3 * MiB)));
    assert.ok(randomBytes(1234, 8 * MiB + 3, 100).equals(random.subarray(MiB - 509, MiB - 409)), 'any sub-range recomputes');
    assert.ok(!randomBytes(1235, 7 * MiB + 512, 64).equals(random.subarray(0, 64)), 'another seed, other bytes');
    await using vdb = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'vdb' });
    assert.equal(vdb.sizeBytes, 8 * MiB);
  });

  test('a steady writer holds its rate and counts what it wrote', async () => {
    const writer = await startWriter({ socketPath: daemon.nbdSocketPath, exportName: 'vdb', rateMiBps: 16, blockBytes: 64 * 1024, seed: 7 });
    await new Promise((resolve) => setTimeout(resolve, 500));
    const counters = await writer.stop();
    assert.equal(counters.bytesWritten, counters.writes * 64 * 1024);
    // 16 MiB/s for ~0.5 s: about 8 MiB; generous bounds for a loaded machine.
    assert.ok(counters.bytesWritten >= 2 * MiB && counters.bytesWritten <= 10 * MiB, `${counters.bytesWritten} bytes`);
  });

  test('an engine exports the base read-only on the same NBD server while the guest keeps writing', async () => {
    await using qmp = await QmpClient.connect(daemon.qmpSocketPath);
    const overlay = join(dir, 'system.overlay.qcow2');
    const writer = await startWriter({ socketPath: daemon.nbdSocketPath, exportName: 'disk0', rateMiBps: 20, seed: 99, offsetBytes: 0, lengthBytes: 32 * MiB });
    try {
      await new Promise((resolve) => setTimeout(resolve, 100));
      // The vm snapshot: guest writes move to the overlay (the writable export follows the active layer).
      await qmp.execute('blockdev-snapshot-sync', { 'node-name': 'disk0', 'snapshot-file': overlay, 'snapshot-node-name': 'disk0-overlay', format: 'qcow2' });
      await assert.rejects(qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: join(dir, 'engine.sock') } } }), /NBD server already running/);
      await qmp.execute('block-export-add', { type: 'nbd', id: 'base-export', 'node-name': 'disk0', name: 'disk0-base', writable: false });
      const first = await hashExport(daemon.nbdSocketPath, 'disk0-base');
      await new Promise((resolve) => setTimeout(resolve, 200));
      const second = await hashExport(daemon.nbdSocketPath, 'disk0-base');
      assert.equal(second, first, 'the base does not change while the guest writes');
      await using base = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0-base' });
      assert.equal(base.readOnly, true);
      assert.ok(writer.counters.writes > 0);
      await base.close();
      await qmp.execute('block-export-del', { id: 'base-export' });
      // Commit the overlay back while the guest still writes.
      const ready = qmp.waitForEvent('BLOCK_JOB_READY', (event) => event.data['device'] === 'commit-disk0', { timeoutMs: 30_000 });
      const completed = qmp.waitForEvent('BLOCK_JOB_COMPLETED', (event) => event.data['device'] === 'commit-disk0', { timeoutMs: 30_000 });
      await qmp.execute('block-commit', { 'job-id': 'commit-disk0', device: 'disk0-overlay', 'base-node': 'disk0' });
      await ready;
      await qmp.execute('block-job-complete', { device: 'commit-disk0' });
      assert.equal((await completed).data['error'], undefined);
    } finally {
      const counters = await writer.stop();
      assert.ok(counters.writes > 0);
      await rm(overlay, { force: true });
    }
    // After the commit the guest's export still works and sits on the base again.
    await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
    await nbd.write(60 * MiB, Buffer.alloc(4096, 9));
    const exports = await qmp.execute<Array<{ id: string; 'node-name': string }>>('query-block-exports');
    assert.ok(exports.some((e) => e.id === 'disk0-export' && e['node-name'] === 'disk0'));
  });
});

describe('StorageDaemon lifetimes', () => {
  let dir: string;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'snapshift-qsd-life-'));
  });

  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  test('stop quits cleanly: no process, no sockets, the persistent bitmap is stored', async () => {
    const image = join(dir, 'clean.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, '16M']);
    const daemon = await StorageDaemon.start({ dir, images: [{ path: image, format: 'qcow2' }] });
    try {
      await using qmp = await QmpClient.connect(daemon.qmpSocketPath);
      await qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'cbt', persistent: true });
    } finally {
      await daemon.stop();
    }
    assert.equal(processExists(daemon.pid), false);
    assert.equal(daemon.running, false);
    assert.equal(existsSync(daemon.qmpSocketPath) || existsSync(daemon.nbdSocketPath), false);
    assert.deepEqual(await qcow2Bitmaps(image), [{ name: 'cbt', flags: ['auto'], granularity: 65536 }]);
  });

  test('kill is a crash: the process is gone and a stored bitmap is left in use, then inconsistent', async () => {
    const image = join(dir, 'crash.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, '16M']);
    await exec('qemu-img', ['bitmap', '--add', image, 'cbt']);
    const daemon = await StorageDaemon.start({ dir, images: [{ path: image, format: 'qcow2' }] });
    await daemon.kill();
    assert.equal(processExists(daemon.pid), false);
    assert.equal(existsSync(daemon.qmpSocketPath), false);
    assert.deepEqual((await qcow2Bitmaps(image))[0]?.flags.sort(), ['auto', 'in-use']);
    await using restarted = await StorageDaemon.start({ dir, images: [{ path: image, format: 'qcow2' }] });
    await using qmp = await QmpClient.connect(restarted.qmpSocketPath);
    const nodes = await qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string; inconsistent?: boolean }> }>>('query-named-block-nodes', { flat: true });
    const bitmap = nodes.find((node) => node['node-name'] === 'disk0')?.['dirty-bitmaps']?.find((b) => b.name === 'cbt');
    assert.equal(bitmap?.inconsistent, true);
  });

  test('a daemon that cannot start says why', async () => {
    await assert.rejects(
      StorageDaemon.start({ dir, images: [{ path: join(dir, 'missing.qcow2'), format: 'qcow2' }] }),
      (error: unknown) => error instanceof SnapshiftError && error.code === 'STORAGE_DAEMON_FAILED' && /missing\.qcow2/.test(error.message),
    );
  });
});
