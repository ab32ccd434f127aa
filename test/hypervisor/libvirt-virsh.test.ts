// libvirt 9.0 through virsh, on the lab's own libvirtd (privileged, in its own mount namespace) with the lab's
// tiny guest under TCG: what libvirt does with disk-only snapshots, active commits, checkpoints and pull backups.
// Needs root and libvirt-daemon-system + libvirt-daemon-driver-qemu + libvirt-clients.
import { after, before, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, readlinkSync, statSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { exec } from '../../src/core/exec.ts';
import { SnapshiftError } from '../../src/core/errors.ts';
import { NbdClient } from '../../src/datamover/nbd/index.ts';
import { NbdDiskSource } from '../../src/datamover/nbd-disk-source.ts';
import { checkpointXml, pullBackupXml } from '../../src/hypervisor/libvirt/libvirt-xml.ts';
import { Virsh } from '../../src/hypervisor/libvirt/virsh.ts';
import { nextOverlayPath } from '../../src/hypervisor/overlay-path.ts';
import { LabDomain, labGuestBoot, type LabGuestBoot } from '../../src/lab/lab-libvirt-domain.ts';
import { LabLibvirt } from '../../src/lab/lab-libvirt.ts';
import { useSharedTestCache } from '../../src/lab/with-lab.ts';
import { makeWorkspace, md5File } from '../support/workspace.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const diskSizeBytes = 64 * MiB;
const vmName = 'lv1';
const uuid = '6b7f1c3e-2d4a-4f5b-9c8d-0e1f2a3b4c5d';
const missing = ['/usr/sbin/libvirtd', '/usr/sbin/virtlogd', '/usr/bin/virsh'].filter((program) => !existsSync(program));
const skip = process.getuid?.() !== 0 ? 'needs root (a privileged libvirtd)' : missing.length > 0 ? `libvirt is not installed (${missing.join(', ')})` : false;

/** Milliseconds `work` took, printed as a diagnostic (answers "how long does each operation take here"). */
async function timed<T>(t: TestContext, what: string, work: () => Promise<T>): Promise<T> {
  const started = performance.now();
  const result = await work();
  t.diagnostic(`${what}: ${Math.round(performance.now() - started)} ms`);
  return result;
}

async function qcow2Bitmaps(image: string): Promise<Array<{ name: string; flags: string[] }>> {
  const { stdout } = await exec('qemu-img', ['info', '-U', '--output=json', image]);
  const info = JSON.parse(stdout) as { 'format-specific'?: { data?: { bitmaps?: Array<{ name: string; flags: string[] }> } } };
  return info['format-specific']?.data?.bitmaps ?? [];
}

async function dirtyRegions(socketPath: string, disk: string): Promise<Array<{ offset: number; length: number }>> {
  await using source = await NbdDiskSource.openBitmap(socketPath, disk, `backup-${disk}`);
  return (await source.dirtyRegions(`backup-${disk}`)).map(({ offset, length }) => ({ offset, length }));
}

async function md5OfExport(socketPath: string, exportName: string): Promise<string> {
  await using nbd = await NbdClient.connect({ socketPath, exportName });
  const hash = createHash('md5');
  for (let at = 0; at < nbd.sizeBytes; at += MiB) hash.update(await nbd.read(at, Math.min(MiB, nbd.sizeBytes - at)));
  return hash.digest('hex');
}

async function firstByteAt(socketPath: string, exportName: string, offsetBytes: number): Promise<number> {
  await using nbd = await NbdClient.connect({ socketPath, exportName });
  const block = await nbd.read(offsetBytes, 64 * KiB);
  assert.ok(block.every((byte) => byte === block[0]), `the 64 KiB at ${offsetBytes} of ${exportName} hold one pattern`);
  return block[0]!;
}

function codeOf(code: string): (error: unknown) => boolean {
  return (error) => {
    assert.ok(error instanceof SnapshiftError, `a SnapshiftError, got ${String(error)}`);
    assert.equal(error.code, code, error.message);
    return true;
  };
}

describe('libvirt through virsh, on the lab libvirtd', { skip }, () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let libvirt: LabLibvirt;
  let virsh: Virsh;
  let guest: LabGuestBoot;
  let domain: LabDomain | undefined;
  /** The two disks, on two "datastores" so each gets its overlay `<vm>-00001.qcow2` beside it. */
  const disks = () => [join(workspace.dir, 'ds1', `${vmName}.qcow2`), join(workspace.dir, 'ds2', `${vmName}.qcow2`)];
  const nbdSocket = () => join(workspace.dir, 'nbd.sock');
  const scratch = (disk: string) => join(workspace.dir, `scratch-${disk}.qcow2`);
  const startDomain = (persistent = false) =>
    LabDomain.start(virsh, { name: persistent ? 'lvp' : vmName, uuid: persistent ? undefined : uuid, disks: disks().map((path) => ({ path })), runDir: join(workspace.dir, 'run'), guest, guestAgent: true, persistent });

  before(async () => {
    workspace = await makeWorkspace('lv');
    guest = await labGuestBoot(useSharedTestCache());
    for (const [index, disk] of disks().entries()) {
      mkdirSync(join(workspace.dir, `ds${index + 1}`));
      await exec('qemu-img', ['create', '-q', '-f', 'qcow2', disk, String(diskSizeBytes)]);
    }
    libvirt = await LabLibvirt.start({ dir: join(workspace.dir, 'lv') });
    virsh = new Virsh(libvirt.uri);
    domain = await startDomain();
  });

  after(async () => {
    await domain?.destroy().catch(() => undefined);
    if (libvirt) {
      const namespace = linkOrEmpty(`/proc/${libvirt.libvirtdPid}/ns/mnt`) || "none";
      await LabLibvirt.stopIn(libvirt.dir);
      // Stopping leaves no process in the namespace (no QEMU), and no socket or pid file (the folder is gone).
      const left = readdirSync('/proc').filter((entry) => /^\d+$/.test(entry) && linkOrEmpty(`/proc/${entry}/ns/mnt`) === namespace);
      assert.deepEqual(left, []);
      assert.equal(existsSync(libvirt.dir), false, 'the lab libvirt folder is gone');
    }
    await workspace?.cleanup();
  });

  test('the lab libvirtd runs in its own mount namespace; the guest boots under TCG with two disks', async (t) => {
    t.diagnostic(`lab libvirtd up in ${libvirt.startMs} ms, guest at its workload ${domain!.bootMs} ms after virsh create`);
    assert.notEqual(readlinkSync(`/proc/${libvirt.libvirtdPid}/ns/mnt`), readlinkSync('/proc/self/ns/mnt'));
    assert.equal(libvirt.socketPath, join(libvirt.dir, 'run', 'libvirt-sock'));
    const listed = await virsh.listDomains();
    assert.deepEqual(listed, [{ name: vmName, uuid, state: 'running' }]);
    const live = await virsh.domain(vmName);
    assert.equal(live.type, 'qemu');
    assert.deepEqual(live.disks.map((disk) => [disk.target, disk.path, disk.format, disk.driver, disk.alias, disk.backingChain.length]), [
      ['vda', disks()[0], 'qcow2', 'qemu', 'virtio-disk0', 0],
      ['vdb', disks()[1], 'qcow2', 'qemu', 'virtio-disk1', 0],
    ]);
    assert.deepEqual(await virsh.blockList(vmName), [
      { type: 'file', device: 'disk', target: 'vda', source: disks()[0] },
      { type: 'file', device: 'disk', target: 'vdb', source: disks()[1] },
    ]);
    // A transient domain has no separate definition: its --inactive XML is the live one (aliases included).
    assert.deepEqual((await virsh.domain(vmName, { inactive: true })).disks.map((disk) => [disk.path, disk.alias]), [[disks()[0], 'virtio-disk0'], [disks()[1], 'virtio-disk1']]);
    await assert.rejects(virsh.domainXml('no-such-vm'), codeOf('LIBVIRT_DOMAIN_UNKNOWN'));
    await assert.rejects(new Virsh(`qemu+unix:///system?socket=${join(workspace.dir, 'none.sock')}`).listDomains(), codeOf('LIBVIRT_CONNECT_FAILED'));
    await domain!.waitForHeartbeats(1);
  });

  test('a guest agent channel with no agent behind it: ping is false, freeze and --quiesce fail with LIBVIRT_AGENT_UNAVAILABLE', async () => {
    assert.equal(await virsh.agentPing(vmName), false);
    await assert.rejects(virsh.fsFreeze(vmName), codeOf('LIBVIRT_AGENT_UNAVAILABLE'));
    const overlays = disks().map((disk, index) => ({ disk: `vd${'ab'[index]}`, overlayPath: nextOverlayPath(disk) }));
    await assert.rejects(virsh.snapshotCreateDiskOnly(vmName, { overlays, quiesce: true }), codeOf('LIBVIRT_AGENT_UNAVAILABLE'));
    assert.deepEqual(overlays.filter((overlay) => existsSync(overlay.overlayPath)), [], 'a refused snapshot leaves no overlay');
  });

  test('(a) disk-only --no-metadata snapshot: the bases stay untouched, blockcommit --active --pivot merges, libvirt keeps nothing', async (t) => {
    await domain!.waitForHeartbeats(1);
    const overlays = disks().map((disk, index) => ({ disk: `vd${'ab'[index]}`, overlayPath: nextOverlayPath(disk) }));
    assert.deepEqual(overlays.map((overlay) => overlay.overlayPath), disks().map((disk) => disk.replace(/\.qcow2$/, '-00001.qcow2')));
    await timed(t, 'snapshot-create-as --disk-only --atomic --no-metadata (2 disks)', () => virsh.snapshotCreateDiskOnly(vmName, { overlays }));
    const onOverlay = await virsh.disks(vmName);
    assert.deepEqual(onOverlay.map((disk) => [disk.path, disk.backingChain.map((layer) => layer.path)]), overlays.map((overlay, index) => [overlay.overlayPath, [disks()[index]]]));
    const baseMd5 = await Promise.all(disks().map((disk) => md5File(disk)));
    const writesBefore = (await domain!.heartbeats()).at(-1)!.writes;
    await domain!.writePattern('vdb', 0, 64 * KiB, 0x5a);
    await domain!.waitForHeartbeats((await domain!.heartbeats()).length + 3);
    assert.ok((await domain!.heartbeats()).at(-1)!.writes > writesBefore, 'the guest kept writing');
    assert.deepEqual(await Promise.all(disks().map((disk) => md5File(disk))), baseMd5, 'QEMU did not write the base files');
    assert.equal((await virsh.run(['snapshot-list', vmName, '--name'])).trim(), '', 'no snapshot metadata');
    for (const overlay of overlays) await timed(t, `blockcommit ${overlay.disk} --active --pivot --wait`, () => virsh.blockCommitActive(vmName, overlay.disk));
    const committed = await virsh.disks(vmName);
    assert.deepEqual(committed.map((disk) => [disk.path, disk.backingChain.length, disk.mirror]), disks().map((disk) => [disk, 0, undefined]));
    for (const overlay of overlays) await rm(overlay.overlayPath);
    assert.equal(await virsh.blockJob(vmName, 'vda'), undefined);
    const statusXml = readFileOrEmpty(join(libvirt.dir, 'run', 'qemu', `${vmName}.xml`));
    assert.ok(statusXml.includes(disks()[0]!) && !statusXml.includes('-00001.qcow2'), "libvirt's status XML names no overlay");
    assert.deepEqual(readdirSync(join(libvirt.dir, 'lib', 'qemu', 'snapshot')), [], 'and it stored no snapshot metadata');
  });

  test('(a) a commit whose waiter died goes on in libvirt: blockjob --info shows it, a second commit is refused, finishActiveCommit pivots it', async (t) => {
    const overlays = disks().map((disk, index) => ({ disk: `vd${'ab'[index]}`, overlayPath: nextOverlayPath(disk) }));
    await virsh.snapshotCreateDiskOnly(vmName, { overlays });
    await domain!.waitForHeartbeats((await domain!.heartbeats()).length + 2);
    // A throttled commit (1 MiB/s: about the guest's write rate, so it cannot converge), its virsh killed by PID.
    const waiter = spawn('virsh', ['-c', virsh.uri, 'blockcommit', vmName, 'vda', '--active', '--pivot', '--wait', '--bandwidth', '1'], { stdio: 'ignore' });
    await new Promise((resolve) => setTimeout(resolve, 1500));
    waiter.kill('SIGKILL');
    await new Promise((resolve) => waiter.once('exit', resolve));
    const job = await virsh.blockJob(vmName, 'vda');
    assert.equal(job?.type, 'Active Block Commit');
    assert.equal(job?.bandwidthMiBps, 1);
    assert.equal(job?.ready, false);
    t.diagnostic(`left-over job: ${JSON.stringify(job)}`);
    await assert.rejects(virsh.blockCommitActive(vmName, 'vda'), codeOf('LIBVIRT_BLOCK_JOB_ACTIVE'));
    assert.equal(await timed(t, 'finishActiveCommit (unthrottle, wait ready, pivot)', () => virsh.finishActiveCommit(vmName, 'vda')), true);
    assert.equal(await virsh.finishActiveCommit(vmName, 'vdb'), false, 'vdb has no job');
    // An aborted active commit leaves the disk on its overlay; committing again works.
    await virsh.run(['blockcommit', vmName, 'vdb', '--active']);
    await virsh.blockJobAbort(vmName, 'vdb');
    assert.equal((await virsh.disks(vmName))[1]!.path, overlays[1]!.overlayPath);
    await virsh.blockCommitActive(vmName, 'vdb');
    assert.deepEqual((await virsh.disks(vmName)).map((disk) => disk.path), disks());
    for (const overlay of overlays) await rm(overlay.overlayPath);
  });

  test('(b) checkpoint C1, writes, snapshot, writes: an incremental pull backup from C1 covers the writes in the base and in the overlay; C1 survives the commit', async (t) => {
    await timed(t, 'checkpoint-create C1', () => virsh.checkpointCreate(vmName, checkpointXml({ name: 'c1', disks: [{ name: 'vda' }, { name: 'vdb' }] })));
    assert.deepEqual(await virsh.checkpointNames(vmName), ['c1']);
    await domain!.writePattern('vdb', 1 * MiB, 64 * KiB, 0xa1); // before the snapshot: lands in the base
    const overlays = disks().map((disk, index) => ({ disk: `vd${'ab'[index]}`, overlayPath: nextOverlayPath(disk) }));
    await virsh.snapshotCreateDiskOnly(vmName, { overlays });
    await domain!.writePattern('vdb', 5 * MiB, 64 * KiB, 0xb2); // after: lands in the overlay
    const sized = await virsh.checkpoint(vmName, 'c1', { size: true });
    assert.equal(sized.disks.find((disk) => disk.name === 'vdb')?.sizeBytes, 128 * KiB, 'checkpoint-dumpxml --size counts both writes');

    const backupXml = pullBackupXml({ incremental: 'c1', socketPath: nbdSocket(), disks: ['vda', 'vdb'].map((name) => ({ name, scratchPath: scratch(name) })) });
    await timed(t, 'backup-begin (pull, incremental from C1, no new checkpoint)', () => virsh.backupBegin(vmName, backupXml));
    const job = await virsh.backupJob(vmName);
    assert.deepEqual(job?.disks.map((disk) => [disk.name, disk.backupMode, disk.exportName, disk.exportBitmap]), [['vda', 'incremental', 'vda', 'backup-vda'], ['vdb', 'incremental', 'vdb', 'backup-vdb']]);
    assert.equal(job?.server?.socketPath, nbdSocket());
    assert.deepEqual(await dirtyRegions(nbdSocket(), 'vdb'), [{ offset: 1 * MiB, length: 64 * KiB }, { offset: 5 * MiB, length: 64 * KiB }]);
    assert.ok((await dirtyRegions(nbdSocket(), 'vda')).length > 0, "the guest's own writes to vda are there too");
    assert.equal(await firstByteAt(nbdSocket(), 'vdb', 1 * MiB), 0xa1);
    assert.equal(await firstByteAt(nbdSocket(), 'vdb', 5 * MiB), 0xb2);
    assert.equal((await virsh.jobInfo(vmName)).operation, 'Backup');
    await timed(t, 'domjobabort (until the job and its scratch files are gone)', () => virsh.jobAbort(vmName));
    assert.equal(await virsh.backupJob(vmName), undefined);
    assert.equal(existsSync(scratch('vda')) || existsSync(nbdSocket()), false, 'libvirt removed its scratch files and the socket');
    assert.equal((await virsh.jobInfo(vmName, { completed: true })).errorMessage, 'Operation canceled');

    // A checkpoint can be made and deleted while the overlay exists.
    await virsh.checkpointCreate(vmName, checkpointXml({ name: 'cx', disks: [{ name: 'vda' }, { name: 'vdb' }] }));
    await virsh.checkpointDelete(vmName, 'cx');
    assert.deepEqual(await virsh.checkpointNames(vmName), ['c1']);

    for (const overlay of overlays) await virsh.blockCommitActive(vmName, overlay.disk);
    for (const overlay of overlays) await rm(overlay.overlayPath);
    await domain!.writePattern('vdb', 9 * MiB, 64 * KiB, 0xc3);
    await virsh.backupBegin(vmName, backupXml);
    assert.deepEqual(await dirtyRegions(nbdSocket(), 'vdb'), [1, 5, 9].map((mib) => ({ offset: mib * MiB, length: 64 * KiB })), 'after the commit, C1 still covers every write since it');
    await virsh.jobAbort(vmName);
  });

  test('(c) fleecing: a pull backup with a scratch file and a new checkpoint C2 reads the instant it began while the guest writes on', async (t) => {
    await domain!.writePattern('vdb', 2 * MiB, 64 * KiB, 0xd4);
    // The reference: each disk's content at the job's start, copied with the guest paused at that instant.
    await virsh.run(['suspend', vmName]);
    const backupXml = pullBackupXml({ incremental: 'c1', socketPath: nbdSocket(), disks: ['vda', 'vdb'].map((name) => ({ name, scratchPath: scratch(name) })) });
    const c2 = checkpointXml({ name: 'c2', disks: [{ name: 'vda' }, { name: 'vdb' }] });
    await timed(t, 'backup-begin with checkpoint C2', () => virsh.backupBegin(vmName, backupXml, { checkpointXml: c2 }));
    const reference: string[] = [];
    for (const [index, disk] of disks().entries()) {
      const raw = join(workspace.dir, `reference-${index}.raw`);
      await exec('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', disk, raw]);
      reference.push(await md5File(raw));
      await rm(raw);
    }
    await virsh.run(['resume', vmName]);
    await domain!.writePattern('vdb', 2 * MiB, 64 * KiB, 0xe5);
    await domain!.writePattern('vdb', 3 * MiB, 64 * KiB, 0xe6);
    await domain!.waitForHeartbeats((await domain!.heartbeats()).length + 4);
    assert.deepEqual(await virsh.checkpointNames(vmName), ['c1', 'c2'], 'C2 was created with the job');
    assert.deepEqual([await md5OfExport(nbdSocket(), 'vda'), await md5OfExport(nbdSocket(), 'vdb')], reference, 'the exports read the instant the job began');
    assert.equal(await firstByteAt(nbdSocket(), 'vdb', 2 * MiB), 0xd4);
    assert.equal(await firstByteAt(nbdSocket(), 'vdb', 3 * MiB), 0);
    const info = await virsh.jobInfo(vmName);
    const scratchBytes = statSync(scratch('vda')).size + statSync(scratch('vdb')).size;
    t.diagnostic(`scratch after ~4 s of guest writes at 1 MiB/s: files ${(scratchBytes / MiB).toFixed(1)} MiB, domjobinfo says ${info.tempUsedBytes} of ${info.tempTotalBytes} bytes`);
    assert.ok(info.tempUsedBytes! >= 128 * KiB, 'copy-before-write put the overwritten blocks in the scratch files');
    assert.equal(info.tempTotalBytes, 2 * diskSizeBytes, 'at most the disks\' size');
    await virsh.jobAbort(vmName);
    assert.equal(existsSync(nbdSocket()) || existsSync(scratch('vda')) || existsSync(scratch('vdb')), false, 'the export and the scratch files are gone');

    // A scratch file that exists is refused; with --reuse-external it is used and left for us to delete.
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', scratch('vda'), String(diskSizeBytes)]);
    await assert.rejects(virsh.backupBegin(vmName, backupXml), codeOf('LIBVIRT_BACKUP_SCRATCH_EXISTS'));
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', scratch('vdb'), String(diskSizeBytes)]);
    await virsh.backupBegin(vmName, backupXml, { reuseExternal: true });
    await virsh.jobAbort(vmName);
    assert.equal(existsSync(scratch('vda')) && existsSync(scratch('vdb')), true, 'reused scratch files stay');
    for (const disk of ['vda', 'vdb']) await rm(scratch(disk));
  });

  test('(d) a transient domain takes its checkpoints with it; the bitmaps stay in the qcow2 and --redefine brings them back', async (t) => {
    const definitions = await Promise.all((await virsh.checkpointNames(vmName)).map((name) => virsh.checkpointDefinition(vmName, name)));
    assert.ok(existsSync(join(libvirt.checkpointMetadataDir(vmName), 'c1.xml')), 'checkpoint metadata lives in /var/lib/libvirt/qemu/checkpoint/<domain>/');
    await timed(t, 'virsh destroy', () => domain!.destroy());
    assert.equal(existsSync(libvirt.checkpointMetadataDir(vmName)), false, 'destroying a transient domain deletes its checkpoint metadata');
    for (const disk of disks()) assert.deepEqual((await qcow2Bitmaps(disk)).map((bitmap) => [bitmap.name, bitmap.flags]).sort(), [['c1', ['auto']], ['c2', ['auto']]]);
    domain = await startDomain();
    assert.deepEqual(await virsh.checkpointNames(vmName), []);
    for (const definition of definitions) await virsh.checkpointCreate(vmName, definition, { redefine: true });
    assert.deepEqual(await virsh.checkpointNames(vmName), ['c1', 'c2']);
    await virsh.backupBegin(vmName, pullBackupXml({ incremental: 'c2', socketPath: nbdSocket(), disks: [{ name: 'vdb', scratchPath: scratch('vdb') }], excludedDisks: ['vda'] }));
    assert.deepEqual(await dirtyRegions(nbdSocket(), 'vdb'), [2, 3].map((mib) => ({ offset: mib * MiB, length: 64 * KiB })), 'C2 tracked across the restart');
    await virsh.jobAbort(vmName);

    // Killed QEMU: the bitmaps stay "in-use" (inconsistent); redefining works, a backup from them does not.
    const qemuPid = Number(readFileOrEmpty(join(libvirt.dir, 'run', 'qemu', `${vmName}.pid`)).trim());
    assert.ok(qemuPid > 0);
    process.kill(qemuPid, 'SIGKILL');
    for (let i = 0; i < 100 && (await virsh.listDomains()).length > 0; i++) await new Promise((resolve) => setTimeout(resolve, 100));
    assert.ok((await qcow2Bitmaps(disks()[1]!)).every((bitmap) => bitmap.flags.includes('in-use')));
    domain = await startDomain();
    for (const definition of definitions) await virsh.checkpointCreate(vmName, definition, { redefine: true });
    await assert.rejects(virsh.backupBegin(vmName, pullBackupXml({ incremental: 'c1', socketPath: nbdSocket(), disks: [{ name: 'vdb', scratchPath: scratch('vdb') }], excludedDisks: ['vda'] })), codeOf('LIBVIRT_CHECKPOINT_INCONSISTENT'));
    await virsh.checkpointDelete(vmName, 'c1', { children: true });
    assert.deepEqual(await virsh.checkpointNames(vmName), []);
    assert.deepEqual(await qcow2Bitmaps(disks()[1]!), [], 'deleting the checkpoints removed the broken bitmaps');
    await domain.destroy();
    domain = undefined;
  });

  test('(d) a persistent domain keeps its checkpoints across destroy and start', async (t) => {
    domain = await startDomain(true);
    await virsh.checkpointCreate('lvp', checkpointXml({ name: 'p1', disks: [{ name: 'vda' }, { name: 'vdb' }] }));
    await domain.writePattern('vdb', 7 * MiB, 64 * KiB, 0x77);
    await domain.destroy({ keepDefinition: true });
    assert.deepEqual(await virsh.listDomains(), [{ name: 'lvp', uuid: domain.uuid, state: 'shut-off' }]);
    assert.ok(existsSync(libvirt.persistentDefinitionPath('lvp')) && existsSync(join(libvirt.checkpointMetadataDir('lvp'), 'p1.xml')));
    await timed(t, 'virsh start (persistent) to the workload', () => domain!.restart());
    assert.deepEqual(await virsh.checkpointNames('lvp'), ['p1']);
    await virsh.backupBegin('lvp', pullBackupXml({ incremental: 'p1', socketPath: nbdSocket(), disks: [{ name: 'vdb', scratchPath: scratch('vdb') }], excludedDisks: ['vda'] }));
    assert.deepEqual(await dirtyRegions(nbdSocket(), 'vdb'), [{ offset: 7 * MiB, length: 64 * KiB }]);
    await virsh.jobAbort('lvp');
    await domain.destroy();
    domain = undefined;
    assert.deepEqual(await virsh.listDomains(), []);
  });
});

function readFileOrEmpty(file: string): string {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return '';
  }
}

function linkOrEmpty(file: string): string {
  try {
    return readlinkSync(file);
  } catch {
    return '';
  }
}
