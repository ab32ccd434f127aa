import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { Catalog } from '../../src/catalog/index.ts';
import { alignRegions, regionBytes, type Region } from '../../src/datamover/extent-map.ts';
import { withCeph } from '../../src/lab/index.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { runBackup } from '../../src/processing/backup-run.ts';
import { huntStorageSnapshots } from '../../src/processing/storage-hunter.ts';
import { initRepository, openRepository, type Repository } from '../../src/repository/index.ts';
import { restoreDisk } from '../../src/restore/disk-restore.ts';
import { makeWorkspace, md5File } from '../support/workspace.ts';
import { guestWrite } from '../support/guest-io.ts';

const MiB = 1024 * 1024;
const password = 'ceph-rbd-cbt-test';
const vmName = 'rbd-cbt-vm';
const sizeBytes = 64 * MiB;

describe('incremental backups of Ceph RBD disks from rbd diff', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let catalog: Catalog;
  let repository: Repository;
  let daemon: StorageDaemon | undefined;

  before(async () => {
    workspace = await makeWorkspace('ceph-cbt');
    mkdirSync(join(workspace.dir, 'home'));
    catalog = Catalog.open(join(workspace.dir, 'home'));
    await initRepository(join(workspace.dir, 'repo'), { password, encryption: true });
    repository = await openRepository(join(workspace.dir, 'repo'), { password });
  });
  // Runs before withCeph's teardown (registered later): nothing holds an RBD image when Ceph goes down.
  after(async () => {
    await daemon?.stop();
    await repository?.close();
    catalog?.close();
    await workspace?.cleanup();
  });
  const ceph = withCeph();
  before(() => {
    process.env['SNAPSHIFT_CEPH_CONF'] = ceph().confPath;
  });

  const image = () => `${ceph().pool}/${vmName}`;

  async function snapshotNames(): Promise<string[]> {
    const { stdout } = await ceph().rbd(['snap', 'ls', '--format', 'json', image()]);
    return (JSON.parse(stdout) as Array<{ name: string }>).map((snapshot) => snapshot.name);
  }

  async function rbdMd5(spec: string): Promise<string> {
    const file = join(workspace.dir, `export-${process.hrtime.bigint()}.raw`);
    await ceph().rbd(['export', '--no-progress', spec, file]);
    return md5File(file);
  }

  /** A storage-snapshot backup; the reference is an RBD snapshot taken while the VM snapshot holds the image still. */
  async function backup(reference: string) {
    const run = await runBackup({
      vms: [catalog.getVm(vmName)!],
      mode: 'storage-snapshot',
      repository,
      catalog,
      runDir: join(workspace.dir, 'run'),
      overlayFolder: join(workspace.dir, 'overlays'),
      hooks: {
        afterVmSnapshots: async () => {
          await ceph().rbd(['snap', 'create', `${image()}@${reference}`]);
        },
      },
    });
    const outcome = run.outcomes[0]!;
    assert.equal(outcome.error, undefined, outcome.error?.message);
    const result = outcome.result!;
    assert.equal(result.stats.mode, 'storage-snapshot');
    assert.equal(result.failoverReason, undefined);
    const restored = join(workspace.dir, `restored-${reference}.raw`);
    await restoreDisk(await repository.openRestorePoint(result.restorePoint.id), 'disk0', restored, { format: 'raw', force: true, chunkSizeBytes: repository.chunkSizeBytes });
    assert.equal(await md5File(restored), await rbdMd5(`${image()}@${reference}`), `the restore point of ${reference} equals the image at its point in time`);
    const ours = (await snapshotNames()).filter((name) => name.startsWith('snapshift-'));
    assert.equal(ours.length, 1, `one retained snapshot of ours between runs, not ${ours.join(', ')}`);
    assert.match(ours[0]!, /^snapshift-cbt-[0-9a-f]{8}$/);
    assert.deepEqual(result.restorePoint.extra.rbdCbt, { disks: { disk0: { image: image(), snapshot: ours[0], virtualSizeBytes: sizeBytes } } }, 'the restore point names its retained base');
    return { ...result, disk: result.stats.disks[0]!, retained: ours[0]! };
  }

  async function writeAll(writes: readonly Region[]): Promise<number> {
    for (const region of writes) await guestWrite(daemon!, region.offset, randomBytes(region.length));
    return regionBytes(alignRegions(writes, repository.chunkSizeBytes, sizeBytes));
  }

  test('full, two incrementals from rbd diff, the retained snapshot kept from hunts, a deleted one means a full read', async (t) => {
    await ceph().rbd(['create', image(), '--size', `${sizeBytes / MiB}M`]);
    const runDir = join(workspace.dir, 'vm');
    mkdirSync(runDir, { recursive: true });
    daemon = await StorageDaemon.start({ dir: runDir, images: [{ rbd: { pool: ceph().pool, image: vmName, conf: ceph().confPath }, format: 'raw', nodeName: 'disk0' }] });
    await guestWrite(daemon, 0, randomBytes(8 * MiB));
    await guestWrite(daemon, 40 * MiB, randomBytes(4 * MiB));
    catalog.addHost({ name: vmName, kind: 'qemu', qmpSocketPath: daemon.qmpSocketPath, nbdSocketPath: daemon.nbdSocketPath });

    const full = await backup('ref-1');
    assert.equal(full.disk.cbtSource, 'none');
    assert.equal(full.disk.fallbackReason, null, 'a first backup has nothing to explain');

    // The hunter leaves the retained base alone (a restore point refers to it), but removes one nothing refers to.
    await ceph().rbd(['snap', 'create', `${image()}@snapshift-cbt-deadbeef`]);
    const hunted = await huntStorageSnapshots(catalog);
    assert.deepEqual(hunted.map((action) => [action.location, action.action]), [[`${image()}@snapshift-cbt-deadbeef`, 'removed']]);
    assert.match(hunted[0]!.detail, /no restore point/);
    assert.deepEqual((await snapshotNames()).filter((name) => name.startsWith('snapshift-')), [full.retained]);

    const incrementals = [
      [
        { offset: 1 * MiB + 4096, length: 64 * 1024 },
        { offset: 20 * MiB, length: 2 * MiB },
      ],
      [
        { offset: 2 * MiB, length: MiB },
        { offset: 60 * MiB + 512, length: 100_000 },
      ],
    ];
    let previousRetained = full.retained;
    for (const [index, writes] of incrementals.entries()) {
      const changedRounded = await writeAll(writes);
      const incremental = await backup(`ref-${index + 2}`);
      t.diagnostic(`incremental ${index + 1}: read ${incremental.disk.readBytes} bytes, rbd diff reported ${incremental.disk.dirtyBytes}, changed rounded to chunks ${changedRounded}`);
      assert.equal(incremental.disk.cbtSource, 'rbd-diff', 'rbd diff is preferred over the bitmap on an RBD disk');
      assert.equal(incremental.disk.fallbackReason, null);
      assert.ok(incremental.disk.readBytes <= 1.1 * changedRounded, `read ${incremental.disk.readBytes} bytes for ${changedRounded} changed (rounded)`);
      assert.ok(incremental.disk.readBytes > 0);
      assert.notEqual(incremental.retained, previousRetained, 'the base moved on to this run');
      previousRetained = incremental.retained;
    }

    // Deleting the retained base by hand: the next backup reads in full, says why, and retains a new base.
    await ceph().rbd(['snap', 'rm', '--no-progress', `${image()}@${previousRetained}`]);
    await writeAll([{ offset: 30 * MiB, length: MiB }]);
    const fallback = await backup('ref-4');
    assert.equal(fallback.disk.cbtSource, 'none');
    assert.match(fallback.disk.fallbackReason ?? '', /retained snapshot .* is gone/);
    assert.equal(fallback.disk.dirtyBytes, null);
    assert.ok(fallback.disk.readBytes >= full.disk.readBytes, `read in full: ${fallback.disk.readBytes} bytes, the first backup read ${full.disk.readBytes}`);

    await writeAll([{ offset: 50 * MiB, length: MiB }]);
    const after = await backup('ref-5');
    assert.equal(after.disk.cbtSource, 'rbd-diff', 'incremental again from the new base');
  });
});
