import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { Catalog } from '../../src/catalog/index.ts';
import { exec } from '../../src/core/exec.ts';
import { NbdClient } from '../../src/datamover/nbd/index.ts';
import { QmpClient } from '../../src/hypervisor/qemu/qmp-client.ts';
import { withLab } from '../../src/lab/index.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { runBackup, type BackupRunResult } from '../../src/processing/backup-run.ts';
import { huntOverlaysOnHosts, huntVmSnapshots } from '../../src/processing/snapshot-hunter.ts';
import { huntStorageSnapshots } from '../../src/processing/storage-hunter.ts';
import type { Repository } from '../../src/repository/index.ts';
import { restoreDisk } from '../../src/restore/disk-restore.ts';
import { makeWorkspace, md5File, md5OfImage } from '../support/workspace.ts';
import { guestWrite } from '../support/guest-io.ts';
import { sigkill, startPausedBackup } from '../support/paused-backup.ts';
import { closeBackupBed, openBackupBed, startVmStandIn } from '../support/backup-bed.ts';
import { HookTime } from '../support/hook-time.ts';

const MiB = 1024 * 1024;
const password = 'storage-test';
/**
 * The VM snapshot's own lifetime in storage-snapshot mode (storage snapshot + commit, the test's hook time taken
 * out) was 60-120 ms here: 1 s keeps it clear of machine load by 8x. The real bar (<= 0.3 s, >= 20x shorter than
 * regular mode) is measured by `npm run bench -- modes`.
 */
const VM_SNAPSHOT_BAR_MS = 1000;

async function ownSnapshotsOn(mountPoint: string): Promise<string[]> {
  const folder = join(mountPoint, '.snapshift-snapshots');
  return existsSync(folder) ? readdirSync(folder) : [];
}

describe('backup from storage snapshots (btrfs, XFS), guest-less', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let catalog: Catalog;
  let repository: Repository;
  const daemons: StorageDaemon[] = [];
  const children: ChildProcess[] = [];

  /** A VM stand-in: a qcow2 on the datastore with data, served by qemu-storage-daemon, in the catalog. */
  async function makeVm(name: string, folder: string, sizeBytes = 32 * MiB): Promise<{ daemon: StorageDaemon; imagePath: string }> {
    const vm = await startVmStandIn({ workspace, catalog, repository }, name, folder, sizeBytes);
    daemons.push(vm.daemon);
    return vm;
  }


  async function backup(vmNames: string[], extra: Partial<Parameters<typeof runBackup>[0]> = {}): Promise<BackupRunResult> {
    return runBackup({ vms: vmNames.map((name) => catalog.getVm(name)!), mode: 'storage-snapshot', repository, catalog, runDir: join(workspace.dir, 'run'), ...extra });
  }

  async function restoredMd5(restorePointId: string, disk = 'disk0'): Promise<string> {
    const target = join(workspace.dir, `restore-${restorePointId}-${disk}.raw`);
    await restoreDisk(await repository.openRestorePoint(restorePointId), disk, target, { format: 'raw', force: true, chunkSizeBytes: repository.chunkSizeBytes });
    return md5File(target);
  }

  before(async () => {
    ({ workspace, catalog, repository } = await openBackupBed('storage', password));
  });

  after(async () => {
    await closeBackupBed({ workspace, catalog, repository }, { daemons, children });
  });
  // Registered after our own `after`, so the daemons holding files on the datastores are gone before it runs.
  const lab = withLab();

  for (const kind of ['btrfs', 'xfs'] as const) {
    test(`${kind}: the VM snapshot lives well under a second, the restore equals the point in time, nothing is left`, async (t) => {
      const store = lab().datastore(kind);
      const { daemon, imagePath } = await makeVm(`${kind}-vm`, store.vmDisksDir);
      let reference = '';
      const writtenAfter = randomBytes(MiB);
      const hookTime = new HookTime();
      const run = await backup([`${kind}-vm`], {
        hooks: {
          afterVmSnapshots: hookTime.wrap(async () => {
            reference = await md5OfImage(imagePath, 'qcow2', workspace.dir);
          }),
          afterStorageSnapshot: async () => {
            // Writes after the storage snapshot must not reach the backup, and must not be lost.
            await guestWrite(daemon, 0, writtenAfter);
          },
        },
      });
      const outcome = run.outcomes[0]!;
      assert.equal(outcome.error, undefined, outcome.error?.message);
      const { stats, restorePoint, storageKinds, failoverReason } = outcome.result!;
      assert.equal(stats.mode, 'storage-snapshot');
      assert.equal(failoverReason, undefined);
      assert.deepEqual(storageKinds, [kind]);
      // The reference md5 runs inside the VM snapshot's window: only the rest (storage snapshot + commit) is ours.
      const ownMs = stats.vmSnapshotLifetimeMs - hookTime.ms;
      t.diagnostic(`VM-snapshot lifetime ${stats.vmSnapshotLifetimeMs.toFixed(0)} ms, of which the test's md5 ${hookTime.ms.toFixed(0)} ms: ${ownMs.toFixed(0)} ms ours`);
      assert.ok(ownMs < VM_SNAPSHOT_BAR_MS, `the VM snapshot lived ${ownMs.toFixed(0)} ms of its own (${stats.vmSnapshotLifetimeMs.toFixed(0)} ms in all)`);
      assert.ok(stats.storageSnapshotLifetimeMs !== null && stats.storageSnapshotLifetimeMs > 0);
      assert.equal(run.storageSnapshotCount, 1);
      assert.equal(await restoredMd5(restorePoint.id), reference);
      assert.deepEqual(await ownSnapshotsOn(store.mountPoint), [], 'no storage snapshot left');
      assert.deepEqual(readdirSync(store.vmDisksDir).filter((name) => name.startsWith(`${kind}-vm`)), [`${kind}-vm.qcow2`], 'no overlay left');
      await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
      assert.deepEqual(await nbd.read(0, MiB), writtenAfter, 'the guest kept its writes');
      assert.deepEqual(catalog.listVmSnapshotLedger(), []);
      assert.deepEqual(catalog.listStorageSnapshotLedger(), []);
    });
  }

  test('grouping: three VMs on one btrfs volume share exactly one storage snapshot', async () => {
    const store = lab().datastore('btrfs');
    for (const name of ['g1', 'g2', 'g3']) await makeVm(name, store.vmDisksDir, 8 * MiB);
    const run = await backup(['g1', 'g2', 'g3']);
    assert.equal(run.storageSnapshotCount, 1);
    for (const outcome of run.outcomes) {
      assert.equal(outcome.error, undefined, outcome.error?.message);
      assert.equal(outcome.result!.stats.mode, 'storage-snapshot');
    }
    // Two groups on one volume, running at once: each snapshot needs its own name.
    const limited = await backup(['g1', 'g2', 'g3'], { vmsPerStorageSnapshot: 2, parallel: 2 });
    assert.equal(limited.storageSnapshotCount, 2, 'at most 2 VMs per storage snapshot');
    for (const outcome of limited.outcomes) assert.equal(outcome.error, undefined, outcome.error?.message);
    assert.deepEqual(await ownSnapshotsOn(store.mountPoint), []);
  });

  test('failover: a disk on ext4 falls back to regular mode with the reason; with failover off the VM is untouched', async () => {
    const folder = join(workspace.dir, 'plain');
    mkdirSync(folder);
    const { imagePath } = await makeVm('plain-vm', folder, 8 * MiB);
    const run = await backup(['plain-vm']);
    const outcome = run.outcomes[0]!;
    assert.equal(outcome.error, undefined, outcome.error?.message);
    assert.equal(outcome.result!.stats.mode, 'regular');
    assert.match(outcome.result!.failoverReason ?? '', /no storage system snapshift can snapshot/);
    assert.equal(await restoredMd5(outcome.result!.restorePoint.id), await md5OfImage(imagePath, 'qcow2', workspace.dir));

    const strict = await backup(['plain-vm'], { failoverToRegular: false });
    assert.match(strict.outcomes[0]!.error?.message ?? '', /failover to regular mode is off/);
    assert.deepEqual(readdirSync(folder), ['plain-vm.qcow2'], 'no overlay was made');
    assert.deepEqual(catalog.listVmSnapshotLedger(), []);
  });

  /** A storage-snapshot backup of `vmName` in a child process, stopped at `pauseAt`. */
  async function pausedBackup(vmName: string, pauseAt: 'vm-snapshot' | 'storage-snapshot'): Promise<ChildProcess> {
    const child = await startPausedBackup({ home: join(workspace.dir, 'home'), repo: join(workspace.dir, 'repo'), mode: 'storage-snapshot', pauseAt, vmNames: [vmName], env: { SNAPSHIFT_PASSWORD: password } });
    children.push(child);
    return child;
  }

  test('hunter: after a SIGKILL between storage snapshot and its removal, and between VM snapshot and commit, hunt removes exactly what we left', async () => {
    const store = lab().datastore('btrfs');
    const { daemon, imagePath } = await makeVm('hunted', store.vmDisksDir, 8 * MiB);
    // A user's own btrfs snapshot and own qcow2 overlay file next to ours must survive the hunt.
    const userSnapshot = join(store.mountPoint, 'users-own-snapshot');
    await exec('btrfs', ['subvolume', 'snapshot', '-r', store.vmDisksDir, userSnapshot]);
    const userOverlay = join(store.vmDisksDir, 'hunted-mine.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', imagePath, userOverlay]);

    // 1. Killed after the storage snapshot, before its removal (the VM snapshot is already committed).
    await sigkill(await pausedBackup('hunted', 'storage-snapshot'));
    assert.equal((await ownSnapshotsOn(store.mountPoint)).length, 1, 'the killed run left its storage snapshot');
    const storageActions = await huntStorageSnapshots(catalog);
    assert.equal(storageActions.filter((action) => action.action === 'removed').length, 1);
    assert.deepEqual(await ownSnapshotsOn(store.mountPoint), []);

    // 2. Killed after the VM snapshot, before its commit.
    await sigkill(await pausedBackup('hunted', 'vm-snapshot'));
    assert.ok(existsSync(join(store.vmDisksDir, 'hunted-00001.qcow2')), 'the killed run left its overlay');
    await guestWrite(daemon, 0, Buffer.alloc(MiB, 0x5a)); // lands in the overlay: must survive the hunt
    const vmActions = [...(await huntVmSnapshots(catalog)), ...(await huntOverlaysOnHosts(catalog))];
    // The killed task had started new changed-block tracking in its snapshot: the hunt undoes that too.
    assert.deepEqual(vmActions.map((action) => action.action), ['committed-live', 'removed-checkpoint']);
    assert.ok(!existsSync(join(store.vmDisksDir, 'hunted-00001.qcow2')));
    {
      await using qmp = await QmpClient.connect(daemon.qmpSocketPath);
      const nodes = await qmp.execute<Array<{ 'node-name': string }>>('query-named-block-nodes', { flat: true });
      assert.ok(!nodes.some((node) => node['node-name'].startsWith('snapshift-')), 'the chain is back to the original');
    }
    await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
    assert.deepEqual(await nbd.read(0, MiB), Buffer.alloc(MiB, 0x5a), 'the write made while snapshotted was committed, not lost');

    assert.ok(existsSync(userOverlay), "the user's own overlay survives");
    assert.ok(existsSync(userSnapshot), "the user's own btrfs snapshot survives");
    assert.deepEqual(catalog.listVmSnapshotLedger(), []);
    assert.deepEqual(catalog.listStorageSnapshotLedger(), []);
    await exec('btrfs', ['subvolume', 'delete', userSnapshot]);
  });
});
