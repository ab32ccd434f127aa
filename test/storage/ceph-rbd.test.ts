import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { Catalog } from '../../src/catalog/index.ts';
import { QmpClient } from '../../src/hypervisor/qemu/qmp-client.ts';
import { listQemuDisks } from '../../src/hypervisor/qemu/qemu-vm.ts';
import { withCeph } from '../../src/lab/index.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { runBackup } from '../../src/processing/backup-run.ts';
import { huntOverlaysOnHosts, huntVmSnapshots } from '../../src/processing/snapshot-hunter.ts';
import { huntStorageSnapshots } from '../../src/processing/storage-hunter.ts';
import type { Repository } from '../../src/repository/index.ts';
import { restoreDisk } from '../../src/restore/disk-restore.ts';
import { makeWorkspace, md5File } from '../support/workspace.ts';
import { guestRead, guestWrite, snapshiftNodesOf } from '../support/guest-io.ts';
import { sigkill, startPausedBackup } from '../support/paused-backup.ts';
import { closeBackupBed, openBackupBed } from '../support/backup-bed.ts';
import { HookTime } from '../support/hook-time.ts';

const MiB = 1024 * 1024;
const password = 'ceph-rbd-test';
/**
 * The VM snapshot's own lifetime on RBD (the RBD snapshot, a monitor decision of ~0.6 s, plus the commit; the
 * test's hook time taken out) was 630-1180 ms here, and over 1 s with the hook: 6 s keeps 5x clear of machine
 * load. How short it really is belongs to `npm run bench -- modes`.
 */
const VM_SNAPSHOT_BAR_MS = 6000;

describe('backup from Ceph RBD snapshots, guest-less', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let catalog: Catalog;
  let repository: Repository;
  let overlayFolder: string;
  const daemons: StorageDaemon[] = [];
  const children: ChildProcess[] = [];

  before(async () => {
    ({ workspace, catalog, repository } = await openBackupBed('ceph', password));
    overlayFolder = join(workspace.dir, 'overlays');
  });

  // Runs before withCeph's teardown (registered later): nothing holds an RBD image when Ceph goes down.
  after(async () => {
    await closeBackupBed({ workspace, catalog, repository }, { daemons, children });
  });
  const ceph = withCeph();
  // The registry's ceph-rbd provider (and backup children) find the lab cluster through the environment.
  before(() => {
    process.env['SNAPSHIFT_CEPH_CONF'] = ceph().confPath;
  });

  /** A VM stand-in: an RBD image with data, served by qemu-storage-daemon through QEMU's rbd driver. */
  async function makeVm(name: string, sizeBytes = 64 * MiB): Promise<StorageDaemon> {
    await ceph().rbd(['create', `${ceph().pool}/${name}`, '--size', `${sizeBytes / MiB}M`]);
    const runDir = join(workspace.dir, 'vms', name);
    mkdirSync(runDir, { recursive: true });
    const daemon = await StorageDaemon.start({ dir: runDir, images: [{ rbd: { pool: ceph().pool, image: name, conf: ceph().confPath }, format: 'raw', nodeName: 'disk0' }] });
    daemons.push(daemon);
    await guestWrite(daemon, 0, randomBytes(4 * MiB));
    await guestWrite(daemon, sizeBytes - 3 * MiB, randomBytes(MiB));
    catalog.addHost({ name, kind: 'qemu', qmpSocketPath: daemon.qmpSocketPath, nbdSocketPath: daemon.nbdSocketPath });
    return daemon;
  }

  /** md5 of the image (or snapshot) as Ceph holds it, read with `rbd export`. */
  async function rbdMd5(spec: string): Promise<string> {
    const file = join(workspace.dir, `export-${process.hrtime.bigint()}.raw`);
    await ceph().rbd(['export', '--no-progress', spec, file]);
    return md5File(file);
  }

  async function snapshotNames(image: string): Promise<string[]> {
    const { stdout } = await ceph().rbd(['snap', 'ls', '--format', 'json', `${ceph().pool}/${image}`]);
    return (JSON.parse(stdout) as Array<{ name: string }>).map((snapshot) => snapshot.name);
  }

  test('the VM snapshot lives only for the RBD snapshot and the commit, the restore equals the point in time, nothing is left', async (t) => {
    const daemon = await makeVm('rbd-vm');
    {
      await using qmp = await QmpClient.connect(daemon.qmpSocketPath);
      const [disk] = await listQemuDisks(qmp);
      assert.equal(disk!.imagePath, `rbd:${ceph().pool}/rbd-vm`, 'QEMU\'s json:{"driver":"rbd",…} name becomes rbd:pool/image');
      assert.equal(disk!.protocol, 'rbd');
    }

    // Nothing writes between here and the VM snapshot: this is the content at the VM snapshot's instant.
    const reference = await rbdMd5(`${ceph().pool}/rbd-vm`);
    const writtenWhileSnapshotted = randomBytes(MiB);
    const writtenAfter = randomBytes(MiB);
    const hookTime = new HookTime();
    const run = await runBackup({
      vms: [catalog.getVm('rbd-vm')!],
      mode: 'storage-snapshot',
      repository,
      catalog,
      runDir: join(workspace.dir, 'run'),
      overlayFolder,
      hooks: {
        afterVmSnapshots: hookTime.wrap(async () => {
          assert.equal(readdirSync(overlayFolder).length, 1, 'the overlay is in the overlay folder');
          await guestWrite(daemon, 0, writtenWhileSnapshotted); // lands in the overlay
        }),
        afterStorageSnapshot: async () => {
          await guestWrite(daemon, MiB, writtenAfter); // lands in the image, after the RBD snapshot
        },
      },
    });
    const outcome = run.outcomes[0]!;
    assert.equal(outcome.error, undefined, outcome.error?.message);
    const { stats, restorePoint, storageKinds, failoverReason } = outcome.result!;
    assert.equal(stats.mode, 'storage-snapshot');
    assert.equal(failoverReason, undefined);
    assert.deepEqual(storageKinds, ['ceph-rbd']);
    // The test's guest write runs inside the VM snapshot's window: only the rest (RBD snapshot + commit) is ours.
    const ownMs = stats.vmSnapshotLifetimeMs - hookTime.ms;
    t.diagnostic(`VM snapshot lifetime ${stats.vmSnapshotLifetimeMs.toFixed(0)} ms, of which the test's write ${hookTime.ms.toFixed(0)} ms: ${ownMs.toFixed(0)} ms ours (commit ${stats.commitMs.toFixed(0)} ms, delta ${stats.deltaBytesAtCommit} bytes)`);
    assert.ok(ownMs < VM_SNAPSHOT_BAR_MS, `the VM snapshot lived ${ownMs.toFixed(0)} ms of its own (${stats.vmSnapshotLifetimeMs.toFixed(0)} ms in all)`);

    const target = join(workspace.dir, 'restored.raw');
    await restoreDisk(await repository.openRestorePoint(restorePoint.id), 'disk0', target, { format: 'raw', force: true, chunkSizeBytes: repository.chunkSizeBytes });
    assert.equal(await md5File(target), reference, 'the restore equals the image at the VM snapshot');

    assert.deepEqual(
      (await snapshotNames('rbd-vm')).filter((name) => name.startsWith('snapshift-')),
      [`snapshift-cbt-${run.sessionId.slice(0, 8)}`],
      'no session snapshot of ours left; the retained base of the next rbd diff stays (test/storage/ceph-rbd-cbt.test.ts)',
    );
    assert.deepEqual(readdirSync(overlayFolder), [], 'no overlay left');
    assert.deepEqual(await snapshiftNodesOf(daemon), [], 'the chain is back to the original');
    assert.deepEqual(await guestRead(daemon, 0, MiB), writtenWhileSnapshotted, 'the write made while snapshotted was committed');
    assert.deepEqual(await guestRead(daemon, MiB, MiB), writtenAfter, 'the write made after the storage snapshot stays');
    assert.deepEqual(catalog.listVmSnapshotLedger(), []);
    assert.deepEqual(catalog.listStorageSnapshotLedger(), []);
  });

  /** A storage-snapshot backup of `vmName` in a child process, stopped at `pauseAt`. */
  async function pausedBackup(vmName: string, pauseAt: 'vm-snapshot' | 'storage-snapshot'): Promise<ChildProcess> {
    const child = await startPausedBackup({
      home: join(workspace.dir, 'home'),
      repo: join(workspace.dir, 'repo'),
      mode: 'storage-snapshot',
      pauseAt,
      vmNames: [vmName],
      env: { SNAPSHIFT_PASSWORD: password, SNAPSHIFT_TEST_OVERLAY_FOLDER: overlayFolder },
    });
    children.push(child);
    return child;
  }

  test('hunter: RBD snapshot and overlay left by SIGKILLed backups are removed; a user snapshot survives', async (t) => {
    const daemon = await makeVm('hunted', 16 * MiB);
    const started = performance.now();
    await ceph().rbd(['snap', 'create', `${ceph().pool}/hunted@users-own`]);
    t.diagnostic(`rbd snap create took ${(performance.now() - started).toFixed(0)} ms`);

    // 1. Killed after the storage snapshot, before its removal (the VM snapshot is already committed).
    await sigkill(await pausedBackup('hunted', 'storage-snapshot'));
    assert.equal((await snapshotNames('hunted')).filter((name) => name.startsWith('snapshift-')).length, 1, 'the killed run left its RBD snapshot');
    const storageActions = await huntStorageSnapshots(catalog);
    assert.deepEqual(storageActions.map((action) => [action.kind, action.action]), [['ceph-rbd', 'removed']]);
    assert.deepEqual(await snapshotNames('hunted'), ['users-own'], "only the user's own snapshot is left");

    // 2. Killed after the VM snapshot, before its commit: the overlay in the overlay folder is committed live.
    await sigkill(await pausedBackup('hunted', 'vm-snapshot'));
    assert.equal(readdirSync(overlayFolder).length, 1, 'the killed run left its overlay');
    await guestWrite(daemon, 0, Buffer.alloc(MiB, 0x5a)); // lands in the overlay: must survive the hunt
    const vmActions = [...(await huntVmSnapshots(catalog)), ...(await huntOverlaysOnHosts(catalog))];
    // The killed task had started new changed-block tracking in its snapshot: the hunt undoes that too.
    assert.deepEqual(vmActions.map((action) => action.action), ['committed-live', 'removed-checkpoint']);
    assert.deepEqual(readdirSync(overlayFolder), []);
    assert.deepEqual(await snapshiftNodesOf(daemon), [], 'the chain is back to the original');
    assert.deepEqual(await guestRead(daemon, 0, MiB), Buffer.alloc(MiB, 0x5a), 'the write made while snapshotted was committed, not lost');
    assert.deepEqual(await snapshotNames('hunted'), ['users-own']);
    assert.deepEqual(catalog.listVmSnapshotLedger(), []);
    assert.deepEqual(catalog.listStorageSnapshotLedger(), []);
  });
});
