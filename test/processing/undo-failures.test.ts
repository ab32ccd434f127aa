// Regression tests for the undo paths issue 10 found wanting: a snapshot transaction that "timed out" after
// QEMU carried it out, a storage group whose cleanup failed after its restore points were committed, a hunt
// that leaves something behind, and a backup stopped by SIGTERM.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { existsSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { SnapshiftError } from '../../src/core/errors.ts';
import { QmpClient } from '../../src/hypervisor/qemu/qmp-client.ts';
import type { QmpSession } from '../../src/hypervisor/qemu/qmp-session.ts';
import { listQemuDisks } from '../../src/hypervisor/qemu/qemu-vm.ts';
import { takeQemuVmSnapshot } from '../../src/hypervisor/qemu/qemu-vm-snapshot.ts';
import { withLab } from '../../src/lab/index.ts';
import type { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { runBackup } from '../../src/processing/backup-run.ts';
import { storageSystems } from '../../src/storage/registry.ts';
import type { StorageSystem } from '../../src/storage/storage-system.ts';
import { closeBackupBed, openBackupBed, startVmStandIn, type BackupBed } from '../support/backup-bed.ts';
import { guestRead, guestWrite, snapshiftNodesOf } from '../support/guest-io.ts';
import { runCli } from '../support/workspace.ts';
import { sigkill, startPausedBackup } from '../support/paused-backup.ts';
import { huntVmSnapshots } from '../../src/processing/snapshot-hunter.ts';

const MiB = 1024 * 1024;
const password = 'undo';

describe('undo paths', () => {
  let bed: BackupBed;
  const daemons: StorageDaemon[] = [];
  const children: ChildProcess[] = [];
  const env = () => ({ SNAPSHIFT_HOME: join(bed.workspace.dir, 'home'), SNAPSHIFT_PASSWORD: password });

  before(async () => {
    bed = await openBackupBed('undo', password);
  });
  after(async () => {
    await closeBackupBed(bed, { daemons, children });
  });
  const lab = withLab();

  test('a snapshot transaction whose answer never came, though QEMU carried it out, is committed: no overlay is deleted under the guest', async () => {
    const { daemon } = await startVmStandIn(bed, 'timed-out', bed.workspace.dir, 16 * MiB);
    daemons.push(daemon);
    const cleared: number[] = [];
    const written = randomBytes(MiB);
    await guestWrite(daemon, 2 * MiB, written);
    {
      await using qmp = await QmpClient.connect(daemon.qmpSocketPath);
      // QEMU runs the transaction; we then act as if the answer had timed out.
      const lostAnswer: QmpSession = {
        execute: async <T,>(command: string, args?: Record<string, unknown>, options?: { timeoutMs?: number }) => {
          const result = await qmp.execute<T>(command, args, options);
          if (command === 'transaction') throw new SnapshiftError('QMP_TIMEOUT', 'QMP command transaction got no answer within 60000 ms');
          return result;
        },
        waitForEvent: (name, predicate, options) => qmp.waitForEvent(name, predicate, options),
        close: async () => undefined,
      };
      await assert.rejects(
        takeQemuVmSnapshot(lostAnswer, await listQemuDisks(qmp), { tag: 'aaaaaaaa', ledger: { recordIntent: () => 7, clear: (id) => void cleared.push(id) } }),
        (error: SnapshiftError) => error.code === 'VM_SNAPSHOT_FAILED' && /QEMU had taken it/.test(error.message),
      );
    }
    assert.deepEqual(await snapshiftNodesOf(daemon), [], 'the overlay QEMU made active was committed');
    assert.deepEqual(readdirSync(bed.workspace.dir).filter((name) => /-\d{5}\.qcow2$/.test(name)), [], 'and its file removed');
    assert.deepEqual(cleared, [7], 'the ledger row goes only once nothing is left');
    const after = randomBytes(MiB);
    await guestWrite(daemon, 3 * MiB, after);
    assert.deepEqual(await guestRead(daemon, 2 * MiB, 2 * MiB), Buffer.concat([written, after]), 'the guest writes to a real image before and after');
  });

  test('a commit job a killed process left READY is adopted by the hunter (no second block-commit), and the VM can be backed up again', async () => {
    const { daemon, imagePath } = await startVmStandIn(bed, 'ready-job', bed.workspace.dir, 16 * MiB);
    daemons.push(daemon);
    const child = await startPausedBackup({ home: join(bed.workspace.dir, 'home'), repo: join(bed.workspace.dir, 'repo'), mode: 'regular', pauseAt: 'vm-snapshot', vmNames: ['ready-job'], env: { SNAPSHIFT_PASSWORD: password } });
    children.push(child);
    await sigkill(child);
    const [overlayNode] = await snapshiftNodesOf(daemon);
    assert.ok(overlayNode, 'the killed backup left its overlay active');
    const written = randomBytes(MiB);
    await guestWrite(daemon, 5 * MiB, written); // lands in the overlay
    {
      // What the killed process would have done next: start the commit, and die once it is READY.
      await using qmp = await QmpClient.connect(daemon.qmpSocketPath);
      const ready = qmp.waitForEvent('BLOCK_JOB_READY', (event) => event.data?.device === `${overlayNode}-commit`);
      await qmp.execute('block-commit', { 'job-id': `${overlayNode}-commit`, device: overlayNode, 'base-node': 'disk0' });
      await ready;
    }
    const actions = await huntVmSnapshots(bed.catalog);
    // The killed task had started new changed-block tracking in its snapshot: the hunt undoes that too.
    assert.deepEqual(actions.map((action) => action.action), ['committed-live', 'removed-checkpoint'], JSON.stringify(actions));
    assert.deepEqual(await snapshiftNodesOf(daemon), []);
    {
      await using qmp = await QmpClient.connect(daemon.qmpSocketPath);
      assert.deepEqual(await qmp.execute('query-block-jobs'), [], 'no job is left open');
    }
    assert.ok(!existsSync(imagePath.replace(/\.qcow2$/, '-00001.qcow2')));
    assert.deepEqual(await guestRead(daemon, 5 * MiB, MiB), written, 'the write made on the overlay was committed');
    const run = await runBackup({ vms: [bed.catalog.getVm('ready-job')!], mode: 'regular', repository: bed.repository, catalog: bed.catalog, runDir: join(bed.workspace.dir, 'run') });
    assert.equal(run.outcomes[0]!.error, undefined, 'the next backup works');
  });

  test('storage group: removing the storage snapshot fails after the restore point was committed: the VM keeps its point (warning), the retry removes the snapshot', async () => {
    const store = lab().datastore('btrfs');
    const { daemon } = await startVmStandIn(bed, 'undo-fails', store.vmDisksDir, 16 * MiB);
    daemons.push(daemon);
    const btrfs = storageSystems().find((system) => system.kind === 'btrfs')!;
    // The snapshot's own removal fails once (as when a file in it is still busy); the hunter's path works.
    const failingRemoval: StorageSystem = {
      kind: btrfs.kind,
      locate: (imagePath) => btrfs.locate(imagePath),
      listOwnSnapshots: (volumes) => btrfs.listOwnSnapshots(volumes),
      removeSnapshot: (info) => btrfs.removeSnapshot(info),
      snapshot: async (volumes, tag, images) => {
        const snapshot = await btrfs.snapshot(volumes, tag, images);
        return {
          info: snapshot.info,
          createdAt: snapshot.createdAt,
          imageAt: (imagePath: string) => snapshot.imageAt(imagePath),
          get lifetimeMs() {
            return snapshot.lifetimeMs;
          },
          [Symbol.asyncDispose]: async () => {
            throw new Error('device or resource busy');
          },
        };
      },
    };
    const run = await runBackup({ vms: [bed.catalog.getVm('undo-fails')!], mode: 'storage-snapshot', repository: bed.repository, catalog: bed.catalog, runDir: join(bed.workspace.dir, 'run'), systems: [failingRemoval] });
    const outcome = run.outcomes[0]!;
    assert.equal(outcome.error, undefined, 'the VM did not fail');
    assert.equal(outcome.result?.stats.mode, 'storage-snapshot');
    assert.match(outcome.result?.warnings?.join(' ') ?? '', /device or resource busy.*removed on retry/);
    assert.ok((await bed.repository.listRestorePoints('undo-fails')).some((point) => point.id === outcome.result!.restorePoint.id), 'its restore point is in the repository');
    const snapshots = join(store.mountPoint, '.snapshift-snapshots');
    assert.deepEqual(existsSync(snapshots) ? readdirSync(snapshots) : [], [], 'the storage snapshot is gone');
    assert.deepEqual(bed.catalog.listStorageSnapshotLedger(), []);
    assert.deepEqual(bed.catalog.listVmSnapshotLedger(), []);
  });

  test('hunt exits non-zero when it leaves something in place, and 0 once nothing is left', async () => {
    const dead = spawn('true');
    await new Promise((resolve) => dead.once('exit', resolve));
    const overlayPath = join(bed.workspace.dir, 'ghost-00001.qcow2');
    writeFileSync(overlayPath, 'not a qcow2 image');
    bed.catalog.recordVmSnapshotIntent({
      vmName: 'ghost',
      hostName: null,
      qmpSocketPath: join(bed.workspace.dir, 'no-such-qmp.sock'),
      ownerPid: dead.pid!,
      sessionId: randomUUID(),
      overlays: [{ baseNodeName: 'disk0', overlayNodeName: 'snapshift-0badc0de-0', overlayPath }],
    });
    const first = await runCli(['hunt'], env());
    assert.equal(first.status, 2, `hunt must fail when the overlay stays:\n${first.stdout}${first.stderr}`);
    assert.match(first.stdout, /left-in-place/);
    assert.ok(existsSync(overlayPath), 'an overlay that cannot be committed is never just deleted');
    const json = await runCli(['hunt', '--json'], env());
    assert.equal(json.status, 2);
    assert.equal((JSON.parse(json.stdout) as { leftInPlace: number }).leftInPlace, 1);
    // The admin deals with it by hand; then the hunt clears the row and is content.
    rmSync(overlayPath);
    const second = await runCli(['hunt'], env());
    assert.equal(second.status, 0, second.stdout + second.stderr);
    assert.deepEqual(bed.catalog.listVmSnapshotLedger(), []);
  });

  test('snapshift backup stopped by SIGTERM mid-copy: exit 3, VM snapshot committed, no partial restore point, nothing left', async () => {
    const { daemon, imagePath } = await startVmStandIn(bed, 'stopped', bed.workspace.dir, 32 * MiB);
    daemons.push(daemon);
    const pointsBefore = (await bed.repository.listRestorePoints('stopped')).length;
    const child = spawn('bin/snapshift', ['backup', 'stopped', '--repo', join(bed.workspace.dir, 'repo'), '--mode', 'regular', '--max-read-rate', '1', '--quiet'], {
      env: { ...process.env, ...env() },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    children.push(child);
    let stderr = '';
    child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.stdout!.resume();
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    const overlay = imagePath.replace(/\.qcow2$/, '-00001.qcow2');
    for (let waited = 0; !existsSync(overlay); waited += 50) {
      assert.ok(waited < 60_000, `the backup never took its VM snapshot:\n${stderr}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    await new Promise((resolve) => setTimeout(resolve, 1_500)); // well into the 1 MB/s copy
    child.kill('SIGTERM');
    assert.equal(await exited, 3, stderr);
    assert.match(stderr, /stopping cleanly/);
    assert.ok(!existsSync(overlay), 'the overlay was committed and removed');
    assert.deepEqual(await snapshiftNodesOf(daemon), []);
    assert.deepEqual(bed.catalog.listVmSnapshotLedger(), []);
    assert.equal((await bed.repository.listRestorePoints('stopped')).length, pointsBefore, 'no partial restore point');
    assert.deepEqual(readdirSync(join(bed.workspace.dir, 'repo', 'locks')), [], 'the lock was released');
    assert.deepEqual(readdirSync(join(bed.workspace.dir, 'repo', 'tmp')), [], 'no temp file is left');
  });
});
