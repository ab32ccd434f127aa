// Fleecing mode end to end (backup --mode fleecing) on qemu-storage-daemon while a "guest" writes 64 KiB every
// ~10 ms: a full and an incremental (CBT) backup, each restored hash-equal to the guest's disk at its point in
// time; no scratch image, job or ledger row left; the guest loses no write.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { Catalog } from '../../src/catalog/index.ts';
import { exec } from '../../src/core/exec.ts';
import { NbdClient } from '../../src/datamover/nbd/index.ts';
import { QmpClient } from '../../src/hypervisor/qemu/qmp-client.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { runBackup } from '../../src/processing/backup-run.ts';
import { initRepository, openRepository, type Repository } from '../../src/repository/index.ts';
import { restoreDisk } from '../../src/restore/disk-restore.ts';
import { SteadyWriter } from '../support/steady-writer.ts';
import { makeWorkspace } from '../support/workspace.ts';

const MiB = 1024 * 1024;
const sha256 = (data: Buffer): string => createHash('sha256').update(data).digest('hex');

describe('fleecing mode (copy-before-write, no delta, no commit) end to end', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let daemon: StorageDaemon;
  let catalog: Catalog;
  let repository: Repository;
  let writer: SteadyWriter;
  const diskBytes = 64 * MiB;

  before(async () => {
    workspace = await makeWorkspace('fleece-mode');
    await exec('mkdir', ['-p', join(workspace.dir, 'disks'), join(workspace.dir, 'home')]);
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', join(workspace.dir, 'disks', 'vm1.qcow2'), String(diskBytes)]);
    daemon = await StorageDaemon.start({ dir: workspace.dir, images: [{ path: join(workspace.dir, 'disks', 'vm1.qcow2'), format: 'qcow2', nodeName: 'disk0' }] });
    writer = await SteadyWriter.prepare({
      connect: () => NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' }),
      sizeBytes: diskBytes,
      dataRanges: [[0, 8 * MiB], [56 * MiB, 8 * MiB]],
      regionOffsetBytes: 16 * MiB,
      regionBytes: 4 * MiB, // 64 blocks: the guest soon overwrites data, which the fleecing must copy aside
      intervalMs: 10,
    });
    catalog = Catalog.open(join(workspace.dir, 'home'));
    catalog.addQemuVm({ name: 'vm1', qmpSocketPath: daemon.qmpSocketPath, nbdSocketPath: daemon.nbdSocketPath });
    await initRepository(join(workspace.dir, 'repo'), { password: 'fleece', encryption: true });
    repository = await openRepository(join(workspace.dir, 'repo'), { password: 'fleece' });
  });

  after(async () => {
    await writer?.stop();
    await repository?.close();
    catalog?.close();
    await daemon?.stop();
    await workspace?.cleanup();
  });

  /** One fleecing backup, restored: the write after which the guest's disk equals what was restored. */
  async function backupAndRestore(name: string) {
    const run = await runBackup({ vms: [catalog.getVm('vm1')!], mode: 'fleecing', repository, catalog, runDir: join(workspace.dir, 'run'),
      // The point in time is held from here on: the guest overwrites ~100 blocks of it before the copy starts.
      hooks: { afterVmSnapshots: () => new Promise((resolve) => setTimeout(resolve, 1_000)) },
    });
    const outcome = run.outcomes[0]!;
    assert.equal(outcome.error, undefined, outcome.error?.message);
    const { stats, restorePoint } = outcome.result!;
    const restored = join(workspace.dir, `${name}.raw`);
    await restoreDisk(await repository.openRestorePoint(restorePoint.id), 'disk0', restored, { format: 'raw', force: true, chunkSizeBytes: repository.chunkSizeBytes });
    const image = await readFile(restored);
    const cut = writer.cutOf(image);
    assert.equal(sha256(image), sha256(writer.expectedAt(cut)), `${name}: the restore equals the guest's disk after write ${cut}`);
    return { stats, cut };
  }

  test('a full and an incremental backup, each restored hash-equal to its point in time while the guest writes', async () => {
    writer.start();
    await writer.waitForWrites(100);
    const full = await backupAndRestore('full');
    assert.equal(full.stats.mode, 'fleecing');
    assert.ok((full.stats.scratchBytes ?? 0) >= 2 * MiB, `the guest overwrote data of the point in time during the read (scratch ${full.stats.scratchBytes} bytes)`);
    assert.ok(full.cut >= 100, 'the guest had written before the point in time');
    await writer.waitForWrites(50);
    const incremental = await backupAndRestore('incremental');
    assert.ok(incremental.cut > full.cut + 50);
    const disk = incremental.stats.disks[0]!;
    assert.equal(disk.cbtSource, 'bitmap', 'the incremental reads what the bitmap started at the first fleecing marks');
    assert.ok(disk.readBytes < diskBytes / 2, `read ${disk.readBytes} bytes of ${diskBytes}`);

    const last = await writer.stop();
    assert.deepEqual(writer.errors, [], 'the guest never failed a write');
    await using live = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
    assert.equal(SteadyWriter.firstDifference(await live.read(0, diskBytes), writer.expectedAt(last)), undefined, 'the guest lost no write');
    assert.deepEqual(catalog.listVmSnapshotLedger(), [], 'no ledger row');
    assert.deepEqual(await readdir(join(workspace.dir, 'disks')), ['vm1.qcow2'], 'no scratch image');
    await using qmp = await QmpClient.connect(daemon.qmpSocketPath);
    assert.deepEqual(await qmp.execute('query-block-jobs'), [], 'no job');
    console.log(`fleecing mode (${last} guest writes in all): full ${full.stats.durationMs.toFixed(0)} ms (fleecing ${full.stats.fleecingLifetimeMs?.toFixed(0)} ms, scratch ${((full.stats.scratchBytes ?? 0) / MiB).toFixed(2)} MiB); incremental read ${(disk.readBytes / MiB).toFixed(1)} MiB`);
  });
});
