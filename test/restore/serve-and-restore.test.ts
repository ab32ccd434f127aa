// A real backup (a guest-less disk on qemu-storage-daemon, backed up through bin/snapshift) served read-only
// over our NBD server and restored in one pass: qcow2 and raw bit-exact, raw sparse, a block device
// overwritten, `snapshift serve` readable by nbdinfo/nbdcopy while gc is refused naming it (issue 13).
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { exec } from '../../src/core/exec.ts';
import { pathExists } from '../../src/core/fs-probe.ts';
import { NbdClient } from '../../src/datamover/nbd/index.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { initRepository } from '../../src/repository/index.ts';
import { guestWrite } from '../support/guest-io.ts';
import { makeWorkspace, md5File, md5OfImage, runCli } from '../support/workspace.ts';

const MiB = 1024 * 1024;
const diskBytes = 48 * MiB;
const password = 'serve-test';

describe('restore point served over NBD, disk restore through it', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let daemon: StorageDaemon | undefined;
  let imagePath: string;
  let diskMd5: string;
  let pointId: string;
  const children: ChildProcess[] = [];
  const repoPath = () => join(workspace.dir, 'repo');
  const env = () => ({ SNAPSHIFT_HOME: join(workspace.dir, 'home'), SNAPSHIFT_PASSWORD: password });

  before(async () => {
    workspace = await makeWorkspace('serve');
    const vmDir = join(workspace.dir, 'vm1');
    await mkdir(vmDir);
    imagePath = join(vmDir, 'vm1.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', imagePath, String(diskBytes)]);
    daemon = await StorageDaemon.start({ dir: vmDir, images: [{ path: imagePath, format: 'qcow2', nodeName: 'disk0' }] });
    // Random data, text, and long zero runs between them.
    await guestWrite(daemon, 0, randomBytes(3 * MiB));
    await guestWrite(daemon, 9 * MiB + 4096, Buffer.alloc(5 * MiB, 'compressible guest text '));
    await guestWrite(daemon, 30 * MiB, randomBytes(2 * MiB + 512));
    await guestWrite(daemon, diskBytes - MiB, randomBytes(MiB));
    await initRepository(repoPath(), { password, encryption: true });
    const added = await runCli(['host', 'add', 'qemu', '--qmp', daemon.qmpSocketPath, '--nbd-socket', daemon.nbdSocketPath, '--name', 'vm1'], env());
    assert.equal(added.status, 0, added.stderr);
    const backup = await runCli(['backup', 'vm1', '--repo', repoPath(), '--mode', 'regular', '--json'], env());
    assert.equal(backup.status, 0, backup.stderr);
    diskMd5 = await md5OfImage(imagePath, 'qcow2', workspace.dir);
    const points = await runCli(['restore-points', 'vm1', '--json'], env());
    assert.equal(points.status, 0, points.stderr);
    pointId = (JSON.parse(points.stdout) as Array<{ id: string }>).at(-1)!.id;
  });
  after(async () => {
    for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await daemon?.stop();
    await workspace?.cleanup();
  });

  test('restore --format qcow2 and raw are the backed-up disk bit for bit; raw stays sparse, qcow2 small', async () => {
    const out = join(workspace.dir, 'out');
    await mkdir(out);
    const qcow2 = await runCli(['restore', 'vm1', '--repo', repoPath(), '--point', pointId, '--to', join(out, 'vm1.qcow2'), '--format', 'qcow2', '--json'], env());
    assert.equal(qcow2.status, 0, qcow2.stderr);
    assert.equal(await md5OfImage(join(out, 'vm1.qcow2'), 'qcow2', workspace.dir), diskMd5);
    const qcow2Info = JSON.parse((await exec('qemu-img', ['info', '--output=json', join(out, 'vm1.qcow2')])).stdout) as { 'virtual-size': number; 'actual-size': number };
    assert.equal(qcow2Info['virtual-size'], diskBytes);
    assert.ok(qcow2Info['actual-size'] < 16 * MiB, `qcow2 holds ${qcow2Info['actual-size']} bytes: zero chunks were not written`);

    const raw = await runCli(['restore', 'vm1', '--repo', repoPath(), '--point', pointId, '--to', join(out, 'vm1.raw'), '--json'], env());
    assert.equal(raw.status, 0, raw.stderr);
    assert.equal(await md5File(join(out, 'vm1.raw')), diskMd5);
    const rawInfo = await stat(join(out, 'vm1.raw'));
    assert.equal(rawInfo.size, diskBytes);
    assert.ok(rawInfo.blocks * 512 < 16 * MiB, `raw file allocates ${rawInfo.blocks * 512} bytes: zero chunks were not written`);

    const all = await runCli(['restore', 'vm1', '--repo', repoPath(), '--point', pointId, '--all-disks', '--to', join(out, 'all'), '--format', 'qcow2', '--quiet'], env());
    assert.equal(all.status, 0, all.stderr);
    assert.deepEqual(await readdir(join(out, 'all')), ['disk0.qcow2']);
    assert.equal(await md5OfImage(join(out, 'all', 'disk0.qcow2'), 'qcow2', workspace.dir), diskMd5);
    assert.deepEqual(await readdir(join(repoPath(), 'locks')), [], 'every restore released its lock');
  });

  test('restore to a block device (a loop device full of 0xff) overwrites it, zero chunks included', async (t) => {
    if (process.getuid?.() !== 0) return t.skip('needs root for a loop device');
    const backing = join(workspace.dir, 'loop-backing.img');
    await exec('dd', ['if=/dev/zero', `of=${backing}`, 'bs=1M', `count=${diskBytes / MiB}`]);
    await exec('sh', ['-c', `tr '\\000' '\\377' < /dev/zero | dd of=${backing} bs=1M count=${diskBytes / MiB} conv=notrunc iflag=fullblock 2>/dev/null`]);
    let device: string;
    try {
      device = (await exec('losetup', ['--find', '--show', backing])).stdout.trim();
    } catch (error) {
      return t.skip(`no loop device here: ${String(error)}`);
    }
    try {
      const refused = await runCli(['restore', 'vm1', '--repo', repoPath(), '--point', pointId, '--to', device], env());
      assert.equal(refused.status, 2);
      assert.match(refused.stderr, new RegExp(`${device} exists: choose another path or pass --force`));
      const restored = await runCli(['restore', 'vm1', '--repo', repoPath(), '--point', pointId, '--to', device, '--force', '--quiet'], env());
      assert.equal(restored.status, 0, restored.stderr);
      assert.equal(await md5File(device), diskMd5);
    } finally {
      await exec('losetup', ['-d', device]);
    }
  });

  test('snapshift serve: nbdinfo maps zero chunks as holes, nbdcopy and our client read the disk bit for bit, gc is refused naming the server; SIGTERM ends it cleanly', async () => {
    const socketPath = join(workspace.dir, 'serve.sock');
    const server = spawn('bin/snapshift', ['serve', 'vm1', '--repo', repoPath(), '--point', pointId, '--socket', socketPath, '--tcp', '127.0.0.1:0', '--json'], {
      env: { ...process.env, ...env() },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    children.push(server);
    let stdout = '';
    let stderr = '';
    server.stderr.on('data', (data: Buffer) => (stderr += data.toString()));
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => server.on('exit', (code, signal) => resolve({ code, signal })));
    const ready = await new Promise<{ pid: number; exports: Array<{ disk: string; sizeBytes: number; uri: string; tcpUri: string }> }>((resolve, reject) => {
      server.stdout.on('data', (data: Buffer) => {
        stdout += data.toString();
        try {
          resolve(JSON.parse(stdout) as never);
        } catch {
          // not the whole document yet
        }
      });
      void exited.then(() => reject(new Error(`serve exited before it was ready: ${stderr}`)));
    });
    assert.equal(ready.pid, server.pid);
    assert.equal(ready.exports.length, 1);
    const { uri, tcpUri, disk, sizeBytes } = ready.exports[0]!;
    assert.equal(disk, 'disk0');
    assert.equal(sizeBytes, diskBytes);

    const map = JSON.parse((await exec('nbdinfo', ['--map', '--json', uri])).stdout) as Array<{ offset: number; length: number; type: number }>;
    const holes = map.filter((e) => e.type === 3).reduce((sum, e) => sum + e.length, 0);
    const data = map.filter((e) => e.type === 0).reduce((sum, e) => sum + e.length, 0);
    assert.equal(holes + data, diskBytes);
    assert.ok(holes >= 30 * MiB, `${holes} bytes of holes: the zero chunks`);
    assert.ok(map.some((e) => e.type === 3 && e.offset <= 20 * MiB && e.offset + e.length >= 21 * MiB), 'the unwritten middle is a hole');

    const copy = join(workspace.dir, 'served.raw');
    await exec('nbdcopy', ['--connections=4', uri, copy]);
    assert.equal(await md5File(copy), diskMd5);
    const port = Number(new URL(tcpUri).port);
    await using client = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'disk0' });
    assert.equal((await client.read(diskBytes - MiB, MiB)).length, MiB);

    const gc = await runCli(['gc', '--repo', repoPath(), '--safety-window', '0'], env());
    assert.equal(gc.status, 2, gc.stdout);
    assert.match(gc.stderr, new RegExp(`is locked \\(shared, serving vm1 over NBD\\) by host .* pid ${server.pid} since`));

    await client.close();
    server.kill('SIGTERM');
    assert.deepEqual(await exited, { code: 0, signal: null }, stderr);
    assert.equal(await pathExists(socketPath), false, 'the socket is removed');
    assert.deepEqual(await readdir(join(repoPath(), 'locks')), [], 'the lock is released');
    const gcAfter = await runCli(['gc', '--repo', repoPath(), '--safety-window', '0'], env());
    assert.equal(gcAfter.status, 0, gcAfter.stderr);
  });
});
