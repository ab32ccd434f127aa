import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { Catalog } from '../../src/catalog/index.ts';
import { exec } from '../../src/core/exec.ts';
import { NbdClient } from '../../src/datamover/nbd/index.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { runBackup } from '../../src/processing/backup-run.ts';
import { checkRepository, initRepository, openRepository } from '../../src/repository/index.ts';
import { restoreDisk } from '../../src/restore/disk-restore.ts';
import { makeWorkspace, md5File, md5OfImage, runCli } from '../support/workspace.ts';
import { guestWrite, snapshiftNodesOf } from '../support/guest-io.ts';
import { sigkill, startPausedBackup } from '../support/paused-backup.ts';

const MiB = 1024 * 1024;
const password = 'faults';

describe('regular processing: faults and bad input', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let catalog: Catalog;
  const daemons: StorageDaemon[] = [];
  const children: ChildProcess[] = [];
  const mounts: string[] = [];
  const servers: Server[] = [];
  const home = () => join(workspace.dir, 'home');
  const repoPath = () => join(workspace.dir, 'repo');
  const env = () => ({ SNAPSHIFT_HOME: home(), SNAPSHIFT_PASSWORD: password });

  /** A VM stand-in with `sizeBytes` of which the first `dataBytes` are random. */
  async function makeVm(name: string, sizeBytes: number, dataBytes: number, format = 'qcow2'): Promise<{ daemon: StorageDaemon; imagePath: string; dir: string }> {
    const dir = join(workspace.dir, 'vms', name);
    mkdirSync(dir, { recursive: true });
    const imagePath = join(dir, `${name}.${format}`);
    await exec('qemu-img', ['create', '-q', '-f', format, imagePath, String(sizeBytes)]);
    const daemon = await StorageDaemon.start({ dir, images: [{ path: imagePath, format: format as 'qcow2', nodeName: 'disk0' }] });
    daemons.push(daemon);
    for (let offset = 0; offset < dataBytes; offset += 4 * MiB) await guestWrite(daemon, offset, randomBytes(Math.min(4 * MiB, dataBytes - offset)));
    catalog.addHost({ name, kind: 'qemu', qmpSocketPath: daemon.qmpSocketPath, nbdSocketPath: daemon.nbdSocketPath });
    return { daemon, imagePath, dir };
  }

  before(async () => {
    workspace = await makeWorkspace('faults');
    mkdirSync(home());
    catalog = Catalog.open(home());
    await initRepository(repoPath(), { password, encryption: true });
  });

  after(async () => {
    for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    for (const server of servers) server.close();
    for (const daemon of daemons) await daemon.stop();
    for (const mount of mounts) await exec('umount', [mount]).catch(() => undefined);
    catalog?.close();
    await workspace?.cleanup();
  });

  test('the backup process SIGKILLed during the copy: the VM runs on, the next backup commits the delta first, the repository checks clean', async () => {
    const { daemon, dir } = await makeVm('killed', 64 * MiB, 24 * MiB);
    const child = await startPausedBackup({ home: home(), repo: repoPath(), mode: 'regular', pauseAt: 'copy', vmNames: ['killed'], env: { SNAPSHIFT_PASSWORD: password } });
    children.push(child);
    await sigkill(child);

    assert.ok(existsSync(join(dir, 'killed-00001.qcow2')), 'the killed backup left its overlay');
    assert.equal(catalog.listVmSnapshotLedger('killed').length, 1, 'and its ledger row');
    const afterKill = randomBytes(MiB);
    await guestWrite(daemon, 40 * MiB, afterKill); // the VM keeps running, writing into the overlay

    await using repository = await openRepository(repoPath(), { password });
    const run = await runBackup({ vms: [catalog.getVm('killed')!], mode: 'regular', repository, catalog, runDir: join(home(), 'run') });
    assert.equal(run.outcomes[0]!.error, undefined, run.outcomes[0]!.error?.message);
    assert.ok(run.hunted.vmSnapshots.some((action) => action.action === 'committed-live' && action.overlayPath.endsWith('killed-00001.qcow2')));
    assert.deepEqual(readdirSync(dir).filter((name) => name.endsWith('.qcow2')), ['killed.qcow2']);
    assert.deepEqual(await snapshiftNodesOf(daemon), []);
    assert.deepEqual(catalog.listVmSnapshotLedger(), []);
    await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
    assert.deepEqual(await nbd.read(40 * MiB, MiB), afterKill, 'the write made into the orphaned overlay was committed, not lost');
    const report = await checkRepository(repository, { readDataPercent: 100 });
    assert.deepEqual(report.problems, []);
  });

  test('the QMP socket file vanishes mid-backup: the backup finishes on its connection and the VM is back on its disk', async () => {
    const { daemon, imagePath } = await makeVm('qmp-gone', 32 * MiB, 8 * MiB);
    await using repository = await openRepository(repoPath(), { password });
    let reference = '';
    const run = await runBackup({
      vms: [catalog.getVm('qmp-gone')!],
      mode: 'regular',
      repository,
      catalog,
      runDir: join(home(), 'run'),
      hooks: {
        afterVmSnapshots: async () => {
          reference = await md5OfImage(imagePath, 'qcow2', workspace.dir);
          await rm(daemon.qmpSocketPath);
        },
      },
    });
    const outcome = run.outcomes[0]!;
    assert.equal(outcome.error, undefined, outcome.error?.message);
    const target = join(workspace.dir, 'qmp-gone.raw');
    await restoreDisk(await repository.openRestorePoint(outcome.result!.restorePoint.id), 'disk0', target, { format: 'raw', force: true, chunkSizeBytes: repository.chunkSizeBytes });
    assert.equal(await md5File(target), reference);
    assert.ok(daemon.running, 'the VM is still running');
    assert.ok(!existsSync(join(workspace.dir, 'vms', 'qmp-gone', 'qmp-gone-00001.qcow2')), 'the overlay was committed and removed');
    // Without its socket the VM cannot be reached again: the next backup says so in one line.
    const next = await runCli(['backup', 'qmp-gone', '--repo', repoPath(), '--mode', 'regular'], env());
    assert.equal(next.status, 2);
    assert.match(next.stderr, /^snapshift: VM qmp-gone: .*qmp\.sock/);
    assert.equal(next.stderr.trim().split('\n').length, 1);
  });

  test('the repository disk fills up: one clear error, VM snapshot committed, earlier restore points intact', async () => {
    const image = join(workspace.dir, 'tiny.img');
    const mountPoint = join(workspace.dir, 'tiny');
    mkdirSync(mountPoint);
    await exec('truncate', ['-s', '24M', image]);
    await exec('mkfs.ext4', ['-q', '-F', '-m', '0', image]);
    await exec('mount', ['-o', 'loop', image, mountPoint]);
    mounts.push(mountPoint);
    const smallRepo = join(mountPoint, 'repo');
    await initRepository(smallRepo, { password, encryption: true, compression: 'none' });
    const { daemon, dir } = await makeVm('full', 64 * MiB, 4 * MiB);
    await using repository = await openRepository(smallRepo, { password });
    const first = await runBackup({ vms: [catalog.getVm('full')!], mode: 'regular', repository, catalog, runDir: join(home(), 'run') });
    assert.equal(first.outcomes[0]!.error, undefined, first.outcomes[0]!.error?.message);
    for (let offset = 4 * MiB; offset < 48 * MiB; offset += 4 * MiB) await guestWrite(daemon, offset, randomBytes(4 * MiB));

    const second = await runBackup({ vms: [catalog.getVm('full')!], mode: 'regular', repository, catalog, runDir: join(home(), 'run') });
    const error = second.outcomes[0]!.error as (Error & { code?: string }) | undefined;
    assert.equal(error?.code, 'REPO_DISK_FULL');
    assert.match(error!.message, /no space left/);
    assert.deepEqual(readdirSync(dir).filter((name) => name.endsWith('.qcow2')), ['full.qcow2'], 'the VM snapshot was committed');
    assert.deepEqual(await snapshiftNodesOf(daemon), []);
    assert.deepEqual(catalog.listVmSnapshotLedger(), []);
    assert.deepEqual((await repository.listRestorePoints('full')).map((point) => point.id), [first.outcomes[0]!.result!.restorePoint.id]);
    assert.deepEqual((await checkRepository(repository, { readDataPercent: 100 })).problems, []);
  });

  test('bad input: an unknown VM, a socket that is not QEMU, a disk format we cannot snapshot: one clear line, the VM untouched', async () => {
    const unknown = await runCli(['backup', 'no-such-vm', '--repo', repoPath(), '--mode', 'regular'], env());
    assert.equal(unknown.status, 2);
    assert.equal(unknown.stderr, 'snapshift: no VM named "no-such-vm": add it with "snapshift host add qemu --qmp PATH --name no-such-vm", or add its libvirt host ("snapshift host add libvirt --uri URI")\n');

    const fakeSocket = join(workspace.dir, 'fake-qmp.sock');
    const server = createServer((socket) => socket.end('SSH-2.0-OpenSSH_9.2\r\n'));
    servers.push(server);
    await new Promise<void>((resolve) => server.listen(fakeSocket, resolve));
    const notQemu = await runCli(['host', 'add', 'qemu', '--qmp', fakeSocket, '--name', 'fake'], env());
    assert.equal(notQemu.status, 2);
    assert.match(notQemu.stderr, /^snapshift: VM fake: .*(QMP|QEMU)/);
    assert.equal(notQemu.stderr.trim().split('\n').length, 1);

    const { daemon, dir } = await makeVm('vmdk-vm', 16 * MiB, 0, 'vmdk');
    const before = readdirSync(dir).sort();
    const unsupported = await runCli(['backup', 'vmdk-vm', '--repo', repoPath(), '--mode', 'regular'], env());
    assert.equal(unsupported.status, 2);
    assert.match(unsupported.stderr, /^snapshift: disk disk0 .* is vmdk: only qcow2 and raw disks can be snapshotted; the VM was not touched\n$/);
    assert.deepEqual(readdirSync(dir).sort(), before);
    assert.deepEqual(await snapshiftNodesOf(daemon), []);
    assert.deepEqual(catalog.listVmSnapshotLedger(), []);
  });
});
