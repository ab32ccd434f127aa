import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { Catalog } from '../../src/catalog/index.ts';
import { exec } from '../../src/core/exec.ts';
import { NbdClient } from '../../src/datamover/nbd/index.ts';
import { QmpClient } from '../../src/hypervisor/qemu/qmp-client.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { runBackup } from '../../src/processing/backup-run.ts';
import { initRepository, openRepository, type Repository } from '../../src/repository/index.ts';
import { restoreDisk } from '../../src/restore/disk-restore.ts';
import { makeWorkspace, md5File, md5OfImage } from '../support/workspace.ts';

const MiB = 1024 * 1024;

/** Writes `data` at `offset` of a daemon's writable export, as a guest would. */
async function guestWrite(daemon: StorageDaemon, exportName: string, offset: number, data: Buffer): Promise<void> {
  await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName });
  await nbd.write(offset, data);
  await nbd.flush();
}

async function guestRead(daemon: StorageDaemon, exportName: string, offset: number, length: number): Promise<Buffer> {
  await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName });
  return await nbd.read(offset, length); // awaited before the connection is disposed
}

describe('regular processing, guest-less (qemu-storage-daemon)', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let daemon: StorageDaemon;
  let catalog: Catalog;
  let repository: Repository;
  const qcow2Path = () => join(workspace.dir, 'disks', 'vm1.qcow2');
  const rawPath = () => join(workspace.dir, 'disks', 'vm1-data.raw');
  // Not a multiple of the 1 MiB chunk: the last chunk is short.
  const qcow2Size = 48 * MiB + 300 * 1024;

  before(async () => {
    workspace = await makeWorkspace('regular');
    await exec('mkdir', ['-p', join(workspace.dir, 'disks'), join(workspace.dir, 'home')]);
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', qcow2Path(), String(qcow2Size)]);
    await exec('qemu-img', ['create', '-q', '-f', 'raw', rawPath(), String(24 * MiB)]);
    daemon = await StorageDaemon.start({
      dir: workspace.dir,
      images: [
        { path: qcow2Path(), format: 'qcow2', nodeName: 'disk0' },
        { path: rawPath(), format: 'raw', nodeName: 'disk1' },
      ],
    });
    // Random data here and there, zeros written on purpose, the short tail, and holes elsewhere.
    await guestWrite(daemon, 'disk0', 0, randomBytes(3 * MiB));
    await guestWrite(daemon, 'disk0', 10 * MiB + 4096, randomBytes(MiB + 512));
    await guestWrite(daemon, 'disk0', 20 * MiB, Buffer.alloc(2 * MiB));
    await guestWrite(daemon, 'disk0', qcow2Size - 100 * 1024, randomBytes(100 * 1024));
    await guestWrite(daemon, 'disk1', 5 * MiB, randomBytes(2 * MiB));
    await guestWrite(daemon, 'disk1', 12 * MiB, Buffer.alloc(MiB, 0x61));
    catalog = Catalog.open(join(workspace.dir, 'home'));
    catalog.addHost({ name: 'vm1', kind: 'qemu', qmpSocketPath: daemon.qmpSocketPath, nbdSocketPath: daemon.nbdSocketPath });
    await initRepository(join(workspace.dir, 'repo'), { password: 'test-password', encryption: true });
    repository = await openRepository(join(workspace.dir, 'repo'), { password: 'test-password' });
  });

  after(async () => {
    await repository?.close();
    catalog?.close();
    await daemon?.stop();
    await workspace?.cleanup();
  });

  test('backs up two disks (qcow2 and raw) while the guest writes, and restores them bit-exact to the point in time', async () => {
    const reference = new Map<string, string>();
    const writtenDuringBackup = randomBytes(MiB);
    const run = await runBackup({
      vms: [catalog.getVm('vm1')!],
      mode: 'regular',
      repository,
      catalog,
      runDir: join(workspace.dir, 'run'),
      readAhead: 2,
      hooks: {
        afterVmSnapshots: async () => {
          // The bases are frozen now: their content is the point in time the restore must equal.
          reference.set('disk0', await md5OfImage(qcow2Path(), 'qcow2', workspace.dir));
          reference.set('disk1', await md5OfImage(rawPath(), 'raw', workspace.dir));
          const overlays = readdirSync(join(workspace.dir, 'disks')).filter((name) => /-\d{5}\.qcow2$/.test(name));
          assert.deepEqual(overlays.sort(), ['vm1-00001.qcow2', 'vm1-data-00001.qcow2'], 'one overlay per disk, beside it, named <image>-00001.qcow2');
          // The guest keeps writing; these writes go to the overlays, not into the backup.
          await guestWrite(daemon, 'disk0', 0, writtenDuringBackup);
          await guestWrite(daemon, 'disk1', 0, writtenDuringBackup);
        },
      },
    });
    const outcome = run.outcomes[0]!;
    assert.equal(outcome.error, undefined, outcome.error?.message);
    const { restorePoint, stats } = outcome.result!;
    assert.equal(stats.mode, 'regular');
    assert.equal(stats.processedBytes, qcow2Size + 24 * MiB);
    assert.ok(stats.readBytes > 0 && stats.readBytes < stats.processedBytes, 'holes are skipped, not read');
    assert.ok(stats.deltaBytesAtCommit > 0, 'the guest wrote into the delta');
    assert.ok(stats.vmSnapshotLifetimeMs > 0 && stats.commitMs > 0);

    for (const [disk, expected] of reference) {
      const reader = await repository.openRestorePoint(restorePoint.id);
      const target = join(workspace.dir, `restored-${disk}.raw`);
      await restoreDisk(reader, disk, target, { format: 'raw', force: false, chunkSizeBytes: repository.chunkSizeBytes });
      assert.equal(await md5File(target), expected, `${disk} restores to the point in time`);
    }

    // The guest is back on its own files, with every write it made during the backup.
    assert.deepEqual(readdirSync(join(workspace.dir, 'disks')).sort(), ['vm1-data.raw', 'vm1.qcow2']);
    assert.deepEqual(await guestRead(daemon, 'disk0', 0, MiB), writtenDuringBackup);
    assert.deepEqual(await guestRead(daemon, 'disk1', 0, MiB), writtenDuringBackup);
    {
      await using qmp = await QmpClient.connect(daemon.qmpSocketPath);
      const nodes = await qmp.execute<Array<{ 'node-name': string; file: string }>>('query-named-block-nodes', { flat: true });
      assert.equal(nodes.filter((node) => node['node-name'].startsWith('snapshift-')).length, 0, 'no overlay node left');
      assert.equal(nodes.find((node) => node['node-name'] === 'disk0')?.file, qcow2Path());
      const exports = await qmp.execute<Array<{ id: string }>>('query-block-exports');
      assert.deepEqual(exports.map((entry) => entry.id).sort(), ['disk0-export', 'disk1-export'], 'our read-only exports are gone');
    }
    assert.deepEqual(catalog.listVmSnapshotLedger(), [], 'the ledger is clear');
    await exec('qemu-img', ['check', '-U', '-q', qcow2Path()]);
  });

  test('a backup of unchanged data stores nothing new', async () => {
    // The first backup's point in time did not include the guest's writes during it: this one picks them up.
    const catchUp = await runBackup({ vms: [catalog.getVm('vm1')!], mode: 'regular', repository, catalog, runDir: join(workspace.dir, 'run') });
    assert.ok(catchUp.outcomes[0]!.result!.stats.transferredBytes >= MiB, 'the 1 MiB the guest wrote during the first backup is new');
    const run = await runBackup({ vms: [catalog.getVm('vm1')!], mode: 'regular', repository, catalog, runDir: join(workspace.dir, 'run') });
    const stats = run.outcomes[0]!.result!.stats;
    assert.ok(stats.transferredBytes < 64 * 1024, `transferred ${stats.transferredBytes} bytes for unchanged disks`);
    assert.equal(catalog.listRestorePoints('vm1').length, 3);
  });

  test('an unknown disk in a restore and an existing target are clear errors', async () => {
    const point = catalog.listRestorePoints('vm1').at(-1)!;
    const reader = await repository.openRestorePoint(point.id);
    await assert.rejects(restoreDisk(reader, 'nope', join(workspace.dir, 'x.raw'), { format: 'raw', force: false, chunkSizeBytes: repository.chunkSizeBytes }), /has no disk "nope"/);
    const existing = join(workspace.dir, 'restored-disk0.raw');
    assert.ok(existsSync(existing));
    await assert.rejects(restoreDisk(reader, 'disk0', existing, { format: 'raw', force: false, chunkSizeBytes: repository.chunkSizeBytes }), /--force/);
  });
});
