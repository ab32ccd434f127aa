// File-level restore (issue 13 part 4): real ext4, XFS and btrfs filesystems in GPT and MBR partitions and on a
// whole disk, made with the real tools, backed up through bin/snapshift from a guest-less qemu-storage-daemon,
// then listed and copied out with `snapshift files` (qemu-storage-daemon reading our NBD server under a
// throwaway overlay, loop devices, read-only mounts): hash-equal files with owners, modes, mtimes and symlinks
// kept, deleted files gone, a crash-consistent XFS whose log must be replayed, clear errors, and after every
// command (failed and killed ones included) no mount, no loop device and no disk reader left. Needs root.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { chmod, chown, lstat, mkdir, readdir, readFile, readlink, rm, symlink, unlink, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { exec } from '../../src/core/exec.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { initRepository } from '../../src/repository/index.ts';
import { makeWorkspace, runCli } from '../support/workspace.ts';

const MiB = 1024 * 1024;
const password = 'files-test';
const owner = { uid: 1234, gid: 5678 };
const setMtime = new Date('2001-02-03T04:05:06.000Z');
const oddName = 'my file ü € 日本.txt';

/** What the test wrote into one filesystem, to compare the restore with. */
interface Expected {
  /** Relative path -> sha256 of a regular file's bytes. */
  sha256: Map<string, string>;
  sizes: Map<string, number>;
}

interface Volume {
  path: string;
  disk: string;
  partition: number | null;
  scheme: string;
  startBytes: number;
  sizeBytes: number;
  filesystem: string | null;
  label: string;
  unsupported?: string;
}

interface Entry {
  name: string;
  path: string;
  type: string;
  mode: string;
  uid: number;
  gid: number;
  sizeBytes: number;
  mtime: string;
  symlinkTarget?: string;
}

async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** The same tree in every filesystem: odd modes, a foreign owner, a set mtime, symlinks, a unicode name, deleted files. */
async function populate(root: string, tag: string): Promise<Expected> {
  const expected: Expected = { sha256: new Map(), sizes: new Map() };
  const put = async (relative: string, data: Buffer, mode = 0o644) => {
    await writeFile(join(root, relative), data);
    await chmod(join(root, relative), mode);
    expected.sha256.set(relative, createHash('sha256').update(data).digest('hex'));
    expected.sizes.set(relative, data.length);
  };
  await mkdir(join(root, 'data/nested/deeper'), { recursive: true });
  await mkdir(join(root, 'conf'));
  await put('data/big.bin', randomBytes(3 * MiB + 123));
  await put('data/secret.key', randomBytes(4096), 0o640);
  await put('data/run.sh', Buffer.from(`#!/bin/sh\necho ${tag}\n`), 0o755);
  await put('data/empty', Buffer.alloc(0), 0o600);
  await put(`data/${oddName}`, Buffer.from(`unicode ${tag}\n`));
  await put('data/nested/deeper/leaf.txt', randomBytes(70_000));
  await put('conf/app.conf', Buffer.from(`name=${tag}\n`));
  await chown(join(root, 'data/secret.key'), owner.uid, owner.gid);
  await chown(join(root, 'data/nested'), owner.uid, owner.gid);
  await chmod(join(root, 'data/nested'), 0o750);
  await symlink('nested/deeper/leaf.txt', join(root, 'data/leaf-link'));
  // An absolute symlink: it means the guest's /conf, never the host's.
  await symlink('/conf', join(root, 'data/conf-link'));
  await utimes(join(root, 'data/big.bin'), setMtime, setMtime);
  // Deleted before the backup: they must not come back.
  await writeFile(join(root, 'data/deleted.tmp'), randomBytes(200_000));
  await exec('sync', []);
  await unlink(join(root, 'data/deleted.tmp'));
  return expected;
}

/** Makes a filesystem on [offset, offset+size) of a raw image through a loop device, fills it, unmounts it. */
async function makeFilesystem(
  image: string,
  offsetBytes: number,
  sizeBytes: number,
  kind: 'ext4' | 'xfs' | 'btrfs',
  label: string,
  mountPoint: string,
  more?: (root: string) => Promise<void>,
): Promise<Expected> {
  const device = (await exec('losetup', ['--find', '--show', '--offset', String(offsetBytes), '--sizelimit', String(sizeBytes), image])).stdout.trim();
  try {
    const mkfs = { ext4: ['mkfs.ext4', '-q', '-L', label], xfs: ['mkfs.xfs', '-q', '-L', label], btrfs: ['mkfs.btrfs', '-q', '-L', label] }[kind];
    await exec(mkfs[0]!, [...mkfs.slice(1), device]);
    await mkdir(mountPoint, { recursive: true });
    await exec('mount', [device, mountPoint]);
    try {
      const expectedFiles = await populate(mountPoint, label);
      await more?.(mountPoint);
      return expectedFiles;
    } finally {
      await exec('umount', [mountPoint]);
    }
  } finally {
    await exec('losetup', ['--detach', device]);
  }
}

/** The partitions sfdisk laid out, in bytes. */
async function partitionsOf(image: string): Promise<Array<{ start: number; size: number }>> {
  const table = JSON.parse((await exec('sfdisk', ['--json', image])).stdout) as { partitiontable: { partitions: Array<{ start: number; size: number }> } };
  return table.partitiontable.partitions.map((partition) => ({ start: partition.start * 512, size: partition.size * 512 }));
}

/** Whatever `files` runs under `home` may have left: mounts, loop devices, processes, run folders. */
async function leftoversOf(home: string): Promise<string[]> {
  const marker = join(home, 'run', 'files-');
  const found: string[] = [];
  for (const line of (await readFile('/proc/self/mountinfo', 'utf8')).split('\n')) {
    const mountPoint = line.split(' ')[4]?.replace(/\\040/g, ' ');
    if (mountPoint?.startsWith(marker)) found.push(`mount ${mountPoint}`);
  }
  const loops = (await exec('losetup', ['--list', '--json', '--output', 'NAME,BACK-FILE'])).stdout;
  if (loops.trim() !== '') {
    for (const loop of (JSON.parse(loops) as { loopdevices: Array<{ name: string; 'back-file': string | null }> }).loopdevices) {
      if (loop['back-file']?.startsWith(marker)) found.push(`loop ${loop.name} on ${loop['back-file']}`);
    }
  }
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.includes(marker)) found.push(`process ${pid}: ${cmdline.replace(/\0/g, ' ')}`);
  }
  const runEntries = await readdir(join(home, 'run')).catch(() => [] as string[]);
  found.push(...runEntries.filter((name) => name.startsWith('files-')).map((name) => `run folder ${name}`));
  return found;
}

describe('file-level restore: snapshift files ls / get on ext4, XFS and btrfs', { skip: process.getuid?.() !== 0 ? 'needs root (loop devices, mounts)' : false }, () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let daemon: StorageDaemon | undefined;
  const expected = new Map<string, Expected>();
  const crashedSha256: string[] = [];
  const home = () => join(workspace.dir, 'home');
  const repoPath = () => join(workspace.dir, 'repo');
  const env = () => ({ SNAPSHIFT_HOME: home(), SNAPSHIFT_PASSWORD: password });
  const files = async (args: string[], extraEnv: Record<string, string> = {}) => {
    const result = await runCli(['files', ...args, '--repo', repoPath()], { ...env(), ...extraEnv });
    assert.deepEqual(await leftoversOf(home()), [], `nothing left after files ${args.join(' ')} (exit ${result.status}: ${result.stderr})`);
    assert.deepEqual(await readdir(join(repoPath(), 'locks')), [], 'the repository lock is released');
    return result;
  };

  before(async () => {
    workspace = await makeWorkspace('files');
    const build = join(workspace.dir, 'build');
    await mkdir(build);
    // vda: GPT with ext4, XFS (at least 300 MiB for mkfs.xfs) and a swap partition; vdb: MBR with btrfs; vdc: ext4 on the whole disk.
    const vda = join(build, 'vda.raw');
    await exec('truncate', ['-s', String(512 * MiB), vda]);
    await exec('sfdisk', ['--quiet', vda], { input: 'label: gpt\nsize=96MiB, type=linux, name="root"\nsize=320MiB, type=linux, name="srv"\nsize=16MiB, type=swap\n' });
    const [root, srv, swap] = await partitionsOf(vda);
    expected.set('vda1', await makeFilesystem(vda, root!.start, root!.size, 'ext4', 'gpt-ext4', join(build, 'm1')));
    expected.set('vda2', await makeFilesystem(vda, srv!.start, srv!.size, 'xfs', 'gpt-xfs', join(build, 'm2'), async (root) => {
      // Enough to copy for a while: the stop test signals a get mid-copy.
      await mkdir(join(root, 'bulk'));
      for (let index = 0; index < 4; index++) await writeFile(join(root, 'bulk', `part-${index}.bin`), randomBytes(16 * MiB));
    }));
    const swapLoop = (await exec('losetup', ['--find', '--show', '--offset', String(swap!.start), '--sizelimit', String(swap!.size), vda])).stdout.trim();
    await exec('mkswap', ['-q', swapLoop]).finally(() => exec('losetup', ['--detach', swapLoop]));

    const vdb = join(build, 'vdb.raw');
    await exec('truncate', ['-s', String(256 * MiB), vdb]);
    await exec('sfdisk', ['--quiet', vdb], { input: 'label: dos\nstart=2048, type=83\n' });
    const [btrfs] = await partitionsOf(vdb);
    expected.set('vdb1', await makeFilesystem(vdb, btrfs!.start, btrfs!.size, 'btrfs', 'mbr-btrfs', join(build, 'm3')));

    const vdc = join(build, 'vdc.raw');
    await exec('truncate', ['-s', String(48 * MiB), vdc]);
    expected.set('vdc', await makeFilesystem(vdc, 0, 48 * MiB, 'ext4', 'whole-ext4', join(build, 'm4')));

    // vdd: an XFS copied while mounted, as a crash-consistent backup sees it: its newest metadata only in the log.
    const vdd = join(build, 'vdd.raw');
    await exec('truncate', ['-s', String(320 * MiB), vdd]);
    const live = (await exec('losetup', ['--find', '--show', vdd])).stdout.trim();
    const liveMount = join(build, 'm5');
    try {
      await exec('mkfs.xfs', ['-q', '-L', 'crashed-xfs', live]);
      await mkdir(liveMount);
      await exec('mount', [live, liveMount]);
      await mkdir(join(liveMount, 'recent'));
      for (let index = 0; index < 5; index++) await writeFile(join(liveMount, 'recent', `file-${index}`), randomBytes(10_000));
      crashedSha256.push(...(await Promise.all([0, 1, 2, 3, 4].map((index) => sha256File(join(liveMount, 'recent', `file-${index}`))))));
      await exec('sync', []);
      await exec('cp', ['--sparse=always', vdd, join(build, 'vdd-crashed.raw')]);
      await exec('umount', [liveMount]);
    } finally {
      await exec('losetup', ['--detach', live]);
    }
    await rm(vdd);
    await exec('mv', [join(build, 'vdd-crashed.raw'), vdd]);

    const vmDir = join(workspace.dir, 'vm1');
    await mkdir(vmDir);
    const images = [];
    for (const name of ['vda', 'vdb', 'vdc', 'vdd']) {
      const qcow2 = join(vmDir, `${name}.qcow2`);
      await exec('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', join(build, `${name}.raw`), qcow2], { timeoutMs: 300_000 });
      images.push({ path: qcow2, format: 'qcow2' as const, nodeName: name });
    }
    await rm(build, { recursive: true, force: true });
    daemon = await StorageDaemon.start({ dir: vmDir, images });
    await initRepository(repoPath(), { password, encryption: true });
    const added = await runCli(['host', 'add', 'qemu', '--qmp', daemon.qmpSocketPath, '--nbd-socket', daemon.nbdSocketPath, '--name', 'vm1'], env());
    assert.equal(added.status, 0, added.stderr);
    const backup = await runCli(['backup', 'vm1', '--repo', repoPath(), '--mode', 'regular', '--json'], env());
    assert.equal(backup.status, 0, backup.stderr);
  });
  after(async () => {
    await daemon?.stop();
    await workspace?.cleanup();
  });

  test('files ls without a path lists every partition and whole-disk filesystem with its kind and label', async () => {
    const listed = await files(['ls', 'vm1', '--json']);
    assert.equal(listed.status, 0, listed.stderr);
    const volumes = (JSON.parse(listed.stdout) as { volumes: Volume[] }).volumes;
    assert.deepEqual(
      volumes.map((volume) => [volume.path, volume.disk, volume.partition, volume.scheme, volume.filesystem, volume.label]),
      [
        ['/vda1', 'vda', 1, 'gpt', 'ext4', 'gpt-ext4'],
        ['/vda2', 'vda', 2, 'gpt', 'xfs', 'gpt-xfs'],
        ['/vda3', 'vda', 3, 'gpt', null, ''],
        ['/vdb1', 'vdb', 1, 'mbr', 'btrfs', 'mbr-btrfs'],
        ['/vdc', 'vdc', null, 'none', 'ext4', 'whole-ext4'],
        ['/vdd', 'vdd', null, 'none', 'xfs', 'crashed-xfs'],
      ],
    );
    assert.equal(volumes[2]!.unsupported, 'Linux swap');
    assert.equal(volumes[1]!.sizeBytes, 320 * MiB);
    assert.equal(volumes[0]!.startBytes, MiB, 'sfdisk aligns the first partition at 1 MiB');

    const text = await files(['ls', 'vm1']);
    assert.equal(text.status, 0, text.stderr);
    assert.match(text.stdout, /^\/vdb1 +\S+ MiB +mbr 1 \(type 83\) +btrfs +mbr-btrfs$/m);
  });

  for (const volume of ['vda1', 'vda2', 'vdb1', 'vdc']) {
    test(`files ls /${volume}/data: names, types, sizes, modes, owners, mtime and symlink targets; deleted files gone`, async () => {
      const listed = await files(['ls', 'vm1', '--point', 'latest', `/${volume}/data`, '--json']);
      assert.equal(listed.status, 0, listed.stderr);
      const { entry, entries } = JSON.parse(listed.stdout) as { entry: Entry; entries: Entry[] };
      assert.equal(entry.type, 'directory');
      assert.equal(entry.path, `/${volume}/data`);
      const byName = new Map(entries.map((item) => [item.name, item]));
      assert.deepEqual(
        entries.map((item) => item.name),
        ['big.bin', 'conf-link', 'empty', 'leaf-link', oddName, 'nested', 'run.sh', 'secret.key'].sort(),
        'deleted.tmp is gone',
      );
      const sizes = expected.get(volume)!.sizes;
      for (const name of ['big.bin', 'secret.key', 'run.sh', 'empty', oddName]) {
        assert.equal(byName.get(name)!.type, 'file', name);
        assert.equal(byName.get(name)!.sizeBytes, sizes.get(`data/${name}`), name);
      }
      assert.deepEqual([byName.get('secret.key')!.mode, byName.get('secret.key')!.uid, byName.get('secret.key')!.gid], ['0640', owner.uid, owner.gid]);
      assert.equal(byName.get('run.sh')!.mode, '0755');
      assert.equal(byName.get('empty')!.mode, '0600');
      assert.deepEqual([byName.get('nested')!.type, byName.get('nested')!.mode, byName.get('nested')!.uid], ['directory', '0750', owner.uid]);
      assert.equal(byName.get('big.bin')!.mtime, setMtime.toISOString());
      assert.deepEqual([byName.get('leaf-link')!.type, byName.get('leaf-link')!.symlinkTarget], ['symlink', 'nested/deeper/leaf.txt']);
      assert.equal(byName.get('conf-link')!.symlinkTarget, '/conf');

      // One file, and a path through the absolute symlink: it resolves inside the guest, never on the host.
      const one = JSON.parse((await files(['ls', 'vm1', `/${volume}/data/conf-link/app.conf`, '--json'])).stdout) as { entry: Entry; entries: Entry[] };
      assert.deepEqual([one.entry.type, one.entry.sizeBytes, one.entries.length], ['file', `name=${volume === 'vdc' ? 'whole-ext4' : expectedLabel(volume)}\n`.length, 0]);
      const text = await files(['ls', 'vm1', `/${volume}/data`]);
      assert.match(text.stdout, /^-rw-r----- +1234:5678 +4096 +\S+ +secret\.key$/m);
      assert.match(text.stdout, /^lrwxrwxrwx +0:0 +\d+ +\S+ +leaf-link -> nested\/deeper\/leaf\.txt$/m);
    });
  }

  test('files get: every file hash-equal, owners, modes, mtimes and symlinks kept, folders copied recursively, from all four filesystems', async () => {
    const out = join(workspace.dir, 'out-all');
    const got = await files(['get', 'vm1', '/vda1/data', '/vda2/data/big.bin', '/vdc/conf', '--to', out, '--json']);
    assert.equal(got.status, 0, got.stderr);
    const report = JSON.parse(got.stdout) as { copied: Array<{ path: string; to: string; files: number; symlinks: number; sizeBytes: number }> };
    assert.deepEqual(report.copied.map((item) => [item.path, item.to]), [['/vda1/data', join(out, 'data')], ['/vda2/data/big.bin', join(out, 'big.bin')], ['/vdc/conf', join(out, 'conf')]]);
    assert.deepEqual([report.copied[0]!.files, report.copied[0]!.symlinks], [6, 2]);
    // Two folders of one name cannot land in one --to.
    const clash = await files(['get', 'vm1', '/vda1/data', '/vdb1/data', '--to', join(workspace.dir, 'out-clash')]);
    assert.equal(clash.status, 64);
    assert.match(clash.stderr, /\/vda1\/data and \/vdb1\/data would both be copied to .*out-clash\/data: get them in two runs with different --to/);
    // btrfs, through a trailing slash (the same folder).
    const btrfsOut = join(workspace.dir, 'out-btrfs');
    const btrfs = await files(['get', 'vm1', '/vdb1/data/', '--to', btrfsOut]);
    assert.equal(btrfs.status, 0, btrfs.stderr);

    for (const [volume, folder] of [['vda1', join(out, 'data')], ['vdb1', join(btrfsOut, 'data')]] as const) {
      // Before anything reads the copy (relatime would move a 2001 atime on the first read).
      assert.equal((await lstat(join(folder, 'big.bin'))).atime.toISOString(), setMtime.toISOString(), `${volume}: atime kept too`);
      for (const [relative, sha256] of expected.get(volume)!.sha256) {
        if (!relative.startsWith('data/')) continue;
        assert.equal(await sha256File(join(folder, relative.slice('data/'.length))), sha256, `${volume}: ${relative}`);
      }
      const secret = await lstat(join(folder, 'secret.key'));
      assert.deepEqual([secret.mode & 0o7777, secret.uid, secret.gid], [0o640, owner.uid, owner.gid], `${volume}: secret.key`);
      assert.equal((await lstat(join(folder, 'run.sh'))).mode & 0o7777, 0o755);
      assert.equal((await lstat(join(folder, 'empty'))).mode & 0o7777, 0o600);
      const nested = await lstat(join(folder, 'nested'));
      assert.deepEqual([nested.isDirectory(), nested.mode & 0o7777, nested.uid, nested.gid], [true, 0o750, owner.uid, owner.gid]);
      assert.equal((await lstat(join(folder, 'big.bin'))).mtime.toISOString(), setMtime.toISOString());
      assert.equal(await readlink(join(folder, 'leaf-link')), 'nested/deeper/leaf.txt');
      assert.equal(await readlink(join(folder, 'conf-link')), '/conf', 'a symlink is copied as a symlink, never followed');
      assert.equal((await readdir(folder)).includes('deleted.tmp'), false);
    }
    assert.equal(await sha256File(join(out, 'big.bin')), expected.get('vda2')!.sha256.get('data/big.bin'));
    assert.equal((await lstat(join(out, 'big.bin'))).mtime.toISOString(), setMtime.toISOString());
    assert.equal(await readFile(join(out, 'conf', 'app.conf'), 'utf8'), 'name=whole-ext4\n');

    // One file through an absolute symlink in the middle of the path, from XFS: the guest's /conf, not the host's.
    const through = join(workspace.dir, 'out-through');
    const viaLink = await files(['get', 'vm1', '/vda2/data/conf-link/app.conf', `/vda1/data/${oddName}`, '--to', through]);
    assert.equal(viaLink.status, 0, viaLink.stderr);
    assert.equal(await readFile(join(through, 'app.conf'), 'utf8'), 'name=gpt-xfs\n');
    assert.equal(await sha256File(join(through, oddName)), expected.get('vda1')!.sha256.get(`data/${oddName}`));
    assert.match(viaLink.stdout, /^copied \/vda2\/data\/conf-link\/app\.conf to .*app\.conf \(1 files, 0 folders, 0 symlinks/m);
  });

  test('a crash-consistent XFS: its log is replayed into the throwaway overlay, so files only the log knew are there, hash-equal', async (t) => {
    const out = join(workspace.dir, 'out-crashed');
    const got = await files(['get', 'vm1', '/vdd/recent', '--to', out]);
    assert.equal(got.status, 0, got.stderr);
    assert.deepEqual(await Promise.all([0, 1, 2, 3, 4].map((index) => sha256File(join(out, 'recent', `file-${index}`)))), crashedSha256);
    // Without the replay the folder is (on this kernel) not there yet: what --no-replay trades for a damaged log.
    const unreplayed = await files(['ls', 'vm1', '/vdd/recent', '--no-replay']);
    t.diagnostic(`--no-replay: exit ${unreplayed.status} ${unreplayed.stderr.trim()}`);
    assert.ok(unreplayed.status === 0 || /no such file or directory/.test(unreplayed.stderr), unreplayed.stderr);
  });

  test('errors: a missing path, no such partition, a swap partition, an existing target; each says what to do, and nothing is left', async () => {
    const missing = await files(['get', 'vm1', '/vda1/data/nope.txt', '--to', join(workspace.dir, 'out-missing')]);
    assert.equal(missing.status, 2);
    assert.match(missing.stderr, /^snapshift: \/vda1\/data\/nope\.txt: no such file or directory in the restore point$/m);

    const notDir = await files(['ls', 'vm1', '/vda2/data/big.bin/inside']);
    assert.equal(notDir.status, 2);
    assert.match(notDir.stderr, /\/vda2\/data\/big\.bin is not a directory/);

    const noVolume = await files(['ls', 'vm1', '/vdz9/etc']);
    assert.equal(noVolume.status, 2);
    assert.match(noVolume.stderr, /no disk or partition "vdz9" in this restore point \(paths start with one of: \/vda1, \/vda2, \/vda3, \/vdb1, \/vdc, \/vdd;/);

    const swap = await files(['ls', 'vm1', '/vda3']);
    assert.equal(swap.status, 2);
    assert.match(swap.stderr, /\/vda3 holds Linux swap: files can be restored from ext2\/3\/4, XFS and btrfs only/);

    const out = join(workspace.dir, 'out-exists');
    assert.equal((await files(['get', 'vm1', '/vdc/conf', '--to', out])).status, 0);
    const exists = await files(['get', 'vm1', '/vdc/conf', '--to', out]);
    assert.equal(exists.status, 2);
    assert.match(exists.stderr, /out-exists\/conf exists: choose another --to, or pass --force to copy over it/);
    assert.equal((await files(['get', 'vm1', '/vdc/conf', '--to', out, '--force'])).status, 0);

    const noVm = await runCli(['files', 'ls', 'vm1', '--repo', repoPath(), '--point', 'ffffffffffff'], env());
    assert.equal(noVm.status, 2);
  });

  test('files get stopped by SIGTERM mid-copy: exit 3, what was undone is said, nothing is left', async () => {
    const out = join(workspace.dir, 'out-stopped');
    const child = spawn('bin/snapshift', ['files', 'get', 'vm1', '/vda2/bulk', '--to', out, '--repo', repoPath()], { env: { ...process.env, ...env() }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    const marker = join(home(), 'run', 'files-');
    // Once the XFS is mounted, the copy is about to start or running.
    for (let tries = 0; tries < 600; tries++) {
      const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
      if (mountinfo.split('\n').some((line) => line.split(' ')[4]?.startsWith(marker) && line.includes(' - xfs '))) break;
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    child.kill('SIGTERM');
    assert.equal(await exited, 3, stderr);
    assert.match(stderr, /SIGTERM: stopping cleanly \(mounts, loop devices and disk readers are removed\)/);
    assert.match(stderr, /^snapshift: stopped by SIGTERM: every mount, loop device and disk reader of this run was removed; files already copied stay$/m);
    assert.deepEqual(await leftoversOf(home()), []);
    assert.deepEqual(await readdir(join(repoPath(), 'locks')), []);
  });

  test('files get SIGKILLed mid-copy: its cp and disk reader die with it (pdeathsig), the mounts stay until the next files run removes them', async () => {
    const out = join(workspace.dir, 'out-sigkill');
    const child = spawn('bin/snapshift', ['files', 'get', 'vm1', '/vda2/bulk', '--to', out, '--repo', repoPath()], { env: { ...process.env, ...env() }, stdio: ['ignore', 'pipe', 'pipe'] });
    const exited = new Promise<NodeJS.Signals | null>((resolve) => child.on('exit', (_code, signal) => resolve(signal)));
    const marker = join(home(), 'run', 'files-');
    let copying = false;
    for (let tries = 0; tries < 600 && !copying; tries++) {
      for (const pid of await readdir('/proc')) {
        if (!/^\d+$/.test(pid)) continue;
        const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
        if (cmdline.startsWith('cp\0') && cmdline.includes(marker)) copying = true;
      }
      if (!copying) await new Promise((resolve) => setTimeout(resolve, 20));
    }
    assert.ok(copying, 'cp started');
    child.kill('SIGKILL');
    assert.equal(await exited, 'SIGKILL');
    await new Promise((resolve) => setTimeout(resolve, 500));
    const left = await leftoversOf(home());
    assert.deepEqual(left.filter((item) => item.startsWith('process ')), [], 'no cp, find or qemu-storage-daemon outlives the killed run');
    assert.ok(left.some((item) => item.startsWith('mount ')) && left.some((item) => item.startsWith('loop ')), left.join('; '));
    const next = await files(['ls', 'vm1', '/vda2/bulk']);
    assert.equal(next.status, 0, next.stderr);
    assert.match(next.stderr, /a killed "files" run left pieces behind: unmounted /);
    assert.match(next.stdout, /part-3\.bin$/m);
  });

  test('a files run killed with everything mounted: the next files run removes its mounts, loop devices and disk reader, then works', async () => {
    const out = join(workspace.dir, 'out-killed');
    const killed = await runCli(['files', 'get', 'vm1', '/vda1/data', '/vdb1/data', '--to', out, '--repo', repoPath()], { ...env(), SNAPSHIFT_FAULT: 'files.after-mount@2' });
    assert.equal(killed.status, 128, `killed by SIGKILL: ${killed.stderr}`);
    const left = await leftoversOf(home());
    assert.ok(left.filter((item) => item.startsWith('mount ')).length >= 3, `the killed run left its mounts: ${left.join('; ')}`);
    assert.ok(left.some((item) => item.startsWith('loop ')), `and its loop devices: ${left.join('; ')}`);

    const next = await files(['ls', 'vm1', '/vdb1/data/nested/deeper']);
    assert.equal(next.status, 0, next.stderr);
    assert.match(next.stderr, /a killed "files" run left pieces behind: unmounted .*; detached loop device \/dev\/loop\d+.*; removed /);
    assert.match(next.stdout, /leaf\.txt$/m);
  });

  test('a killed files ls leaves its mount, loop device and disk file; snapshift hunt --dry-run reports them and hunt removes them', async () => {
    const killed = await runCli(['files', 'ls', 'vm1', '/vdc/conf', '--repo', repoPath()], { ...env(), SNAPSHIFT_FAULT: 'files.after-mount' });
    assert.equal(killed.status, 128, killed.stderr);
    assert.notDeepEqual(await leftoversOf(home()), []);
    const dry = await runCli(['hunt', '--dry-run', '--json'], env());
    assert.equal(dry.status, 0, dry.stderr);
    assert.notDeepEqual(await leftoversOf(home()), [], 'a dry run removes nothing');
    const wouldDo = (JSON.parse(dry.stdout) as { fileRestores: Array<{ unmounted: string[]; detachedLoops: string[] }> }).fileRestores;
    assert.deepEqual(wouldDo.map((report) => [report.unmounted.length, report.detachedLoops.length]), [[2, 1]], 'the ext4 mount and the disk file\'s FUSE mount, one loop device');
    const hunt = await runCli(['hunt', '--json'], env());
    assert.equal(hunt.status, 0, hunt.stderr);
    const fileRestores = (JSON.parse(hunt.stdout) as { fileRestores: Array<{ unmounted: string[]; detachedLoops: string[]; removedFolder: boolean }> }).fileRestores;
    assert.equal(fileRestores.length, 1);
    assert.equal(fileRestores[0]!.removedFolder, true);
    assert.deepEqual([fileRestores[0]!.unmounted.length, fileRestores[0]!.detachedLoops.length], [2, 1]);
    assert.deepEqual(await leftoversOf(home()), []);
  });
});

function expectedLabel(volume: string): string {
  return { vda1: 'gpt-ext4', vda2: 'gpt-xfs', vdb1: 'mbr-btrfs', vdc: 'whole-ext4' }[volume]!;
}
