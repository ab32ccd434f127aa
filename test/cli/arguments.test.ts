// The CLI's arguments keep their word (issue 11): numbers are checked by one validator (exit 64, the option
// named), every repository command takes PATH or --repo, restore says a folder is missing and puts several
// disks (or --all-disks) in a folder, check reads a read-only repository, and `snapshift … | head` ends quietly.
// No VM needed: restore points are written straight into a repository.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdir, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { parseCliNumber } from '../../src/cli/number-option.ts';
import { exec } from '../../src/core/exec.ts';
import { initRepository, openRepository } from '../../src/repository/index.ts';
import { backup, md5, mixedDisk } from '../repository/helpers.ts';
import { makeWorkspace, md5File, runCli } from '../support/workspace.ts';

const chunk = 256 * 1024;
const password = 'arguments';

describe('CLI arguments', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  const mounts: string[] = [];
  const repoPath = () => join(workspace.dir, 'repo');
  const env = () => ({ SNAPSHIFT_HOME: join(workspace.dir, 'home'), SNAPSHIFT_PASSWORD: password });
  const disks = { vda: mixedDisk(5 * chunk + 7, chunk, 1), vdb: mixedDisk(3 * chunk, chunk, 2) };
  let pointId: string;

  before(async () => {
    workspace = await makeWorkspace('cli-args');
    await initRepository(repoPath(), { password, encryption: true, chunkSizeBytes: chunk });
    await using repository = await openRepository(repoPath(), { password });
    pointId = (await backup(repository, 'vm1', disks)).id;
  });
  // Unmount before the workspace goes: a recursive remove must never walk into a live bind mount.
  after(async () => {
    for (const mountPoint of mounts.splice(0).reverse()) await exec('umount', [mountPoint]).catch(() => undefined);
    await workspace?.cleanup();
  });

  test('one number validator: plain digits within bounds, else a usage error naming the option', () => {
    assert.equal(parseCliNumber('7', '--keep-last'), 7);
    assert.equal(parseCliNumber('0', '--keep-last', { min: 0 }), 0);
    assert.equal(parseCliNumber('2.5', '--seconds', { integer: false, min: 0 }), 2.5);
    for (const bad of ['0', '-3', 'abc', '', ' 5', '1.5', '0x10', '1e3', 'Infinity']) {
      assert.throws(() => parseCliNumber(bad, '--max-read-rate', { unit: 'MB/s' }), { code: 'USAGE', message: `--max-read-rate must be a whole number ≥ 1 (MB/s), not "${bad}"` }, JSON.stringify(bad));
    }
    assert.throws(() => parseCliNumber('0', '--read-data', { integer: false, above: 0, max: 100 }), { message: '--read-data must be a number above 0 and ≤ 100, not "0"' });
    assert.throws(() => parseCliNumber('70000', '--port', { max: 65535 }), { message: '--port must be a whole number ≥ 1 and ≤ 65535, not "70000"' });
  });

  test('job run --max-read-rate / --max-write-rate: 0, negative and non-numbers exit 64 with one clear line', async () => {
    for (const [option, value] of [['--max-read-rate', '0'], ['--max-read-rate', '-5'], ['--max-write-rate', 'fast'], ['--max-write-rate', '0'], ['--max-read-rate', '2.5']] as const) {
      const result = await runCli(['job', 'run', 'nightly', `${option}=${value}`], env());
      assert.equal(result.status, 64, `${option} ${value}: ${result.stderr}`);
      assert.equal(result.stderr, `snapshift: ${option} must be a whole number ≥ 1 (MB/s), not "${value}"\n`);
    }
    // The space-separated form reads "-5" as the value too.
    const negative = await runCli(['job', 'run', 'nightly', '--max-read-rate', '-5'], env());
    assert.equal(negative.status, 64);
    assert.match(negative.stderr, /--max-read-rate must be a whole number ≥ 1 \(MB\/s\), not "-5"/);
    // Good values pass the check; the job itself is what is missing then.
    const unknownJob = await runCli(['job', 'run', 'nightly', '--max-read-rate', '100', '--max-write-rate', '50', '--full'], env());
    assert.equal(unknownJob.status, 2);
    assert.equal(unknownJob.stderr, 'snapshift: no job named "nightly" (see "snapshift job list")\n');
  });

  test('the other numbers go through the same validator', async () => {
    const cases: Array<[string[], RegExp]> = [
      [['backup', 'vm1', '--vms-per-storage-snapshot', '0'], /--vms-per-storage-snapshot must be a whole number ≥ 1, not "0"/],
      [['backup', 'vm1', '--max-read-rate', 'lots'], /--max-read-rate must be a whole number ≥ 1 \(MB\/s\), not "lots"/],
      [['job', 'create', 'j', '--vm', 'vm1', '--repo', repoPath(), '--parallel', '0'], /--parallel must be a whole number ≥ 1, not "0"/],
      [['job', 'create', 'j', '--vm', 'vm1', '--repo', repoPath(), '--keep-last', 'x'], /--keep-last must be a whole number ≥ 1, not "x"/],
      [['session', 'list', '--limit', '0'], /--limit must be a whole number ≥ 1, not "0"/],
      [['gc', repoPath(), '--safety-window', '-1'], /--safety-window must be a number ≥ 0 \(minutes\), not "-1"/],
      [['check', repoPath(), '--read-data=0'], /--read-data must be a number above 0 and ≤ 100 \(percent of the packs\), not "0"/],
      [['check', repoPath(), '--read-data=150%'], /--read-data must be a number above 0 and ≤ 100 \(percent of the packs\), not "150"/],
      [['forget', repoPath(), '--keep-last', '-1'], /--keep-last must be a whole number ≥ 0, not "-1"/],
      [['lab', 'ceph', 'up', '--port', '70000'], /--port must be a whole number ≥ 1 and ≤ 65535 \(a TCP port\), not "70000"/],
    ];
    for (const [args, message] of cases) {
      const result = await runCli(args, env());
      assert.equal(result.status, 64, `${args.join(' ')}: ${result.stderr}`);
      assert.match(result.stderr, message);
      assert.equal(result.stderr.trim().split('\n').length, 1, result.stderr);
    }
  });

  test('every repository command takes the repository as PATH or as --repo, alike', async () => {
    const byPath = await runCli(['repo', 'info', repoPath(), '--json'], env());
    const byOption = await runCli(['repo', 'info', '--repo', repoPath(), '--json'], env());
    const byEnv = await runCli(['repo', 'info', '--json'], { ...env(), SNAPSHIFT_REPOSITORY: repoPath() });
    for (const result of [byPath, byOption, byEnv]) assert.equal(result.status, 0, result.stderr);
    assert.deepEqual(JSON.parse(byPath.stdout), JSON.parse(byOption.stdout));
    assert.deepEqual(JSON.parse(byPath.stdout), JSON.parse(byEnv.stdout));
    assert.equal((JSON.parse(byPath.stdout) as { restorePoints: number }).restorePoints, 1);

    for (const args of [['repo', 'list'], ['repo', 'key', 'list'], ['check'], ['gc', '--dry-run'], ['forget', '--keep-last', '1', '--dry-run']]) {
      for (const form of [[repoPath()], ['--repo', repoPath()]]) {
        const result = await runCli([...args, ...form], env());
        assert.equal(result.status, 0, `${[...args, ...form].join(' ')}: ${result.stderr}`);
      }
    }
    // The same repository twice is fine; two different ones are a usage error.
    assert.equal((await runCli(['repo', 'info', repoPath(), '--repo', `${repoPath()}/`], env())).status, 0);
    const two = await runCli(['repo', 'info', repoPath(), '--repo', join(workspace.dir, 'other')], env());
    assert.equal(two.status, 64);
    assert.match(two.stderr, /^snapshift: two repositories given: .*repo and --repo .*other; name one\n$/);
    const none = await runCli(['repo', 'info'], env());
    assert.equal(none.status, 64);
    assert.match(none.stderr, /no repository given: name it \(snapshift repo info PATH\), use --repo PATH or set SNAPSHIFT_REPOSITORY/);

    // init both ways, too.
    for (const form of [[join(workspace.dir, 'init-by-path')], ['--repo', join(workspace.dir, 'init-by-option')]]) {
      const init = await runCli(['repo', 'init', ...form, '--no-encryption'], env());
      assert.equal(init.status, 0, init.stderr);
      assert.match(init.stdout, /^created UNENCRYPTED repository at /);
    }
    assert.equal((await runCli(['repo', 'info', join(workspace.dir, 'init-by-option')], env())).status, 0);
  });

  test('restore --to in a missing folder says the folder is missing, before the repository is read', async () => {
    const missing = join(workspace.dir, 'missing', 'dir');
    const result = await runCli(['restore', 'vm1', '--repo', repoPath(), '--point', pointId, '--disk', 'vda', '--to', join(missing, 'x.raw')], env());
    assert.equal(result.status, 2);
    assert.equal(result.stderr, `snapshift: cannot restore to ${join(missing, 'x.raw')}: the folder ${missing} does not exist; create it first (mkdir -p ${missing}) or choose another --to\n`);
    assert.doesNotMatch(result.stderr, /ENOENT|snapshift-partial/);
    // Several disks into a folder whose parent is missing: the same message, for the folder's parent.
    const all = await runCli(['restore', 'vm1', '--repo', repoPath(), '--point', pointId, '--to', join(missing, 'disks')], env());
    assert.equal(all.status, 2);
    assert.match(all.stderr, /the folder .*missing\/dir does not exist/);
  });

  test('restore: several disks, or --all-disks, go into a folder as <disk>.<format>; one disk into an existing folder too', async () => {
    const several = join(workspace.dir, 'several');
    const result = await runCli(['restore', 'vm1', '--repo', repoPath(), '--point', pointId, '--to', several, '--quiet'], env());
    assert.equal(result.status, 0, result.stderr);
    assert.deepEqual((await readdir(several)).sort(), ['vda.raw', 'vdb.raw']);
    assert.equal(await md5File(join(several, 'vda.raw')), md5(disks.vda));
    assert.equal(await md5File(join(several, 'vdb.raw')), md5(disks.vdb));

    // --all-disks with --disk is a contradiction.
    const both = await runCli(['restore', 'vm1', '--repo', repoPath(), '--point', pointId, '--disk', 'vda', '--all-disks', '--to', several], env());
    assert.equal(both.status, 64);
    assert.match(both.stderr, /--disk and --all-disks exclude each other/);

    // An existing folder takes a single disk as <disk>.<format>.
    const folder = join(workspace.dir, 'one-disk-folder');
    await mkdir(folder);
    const one = await runCli(['restore', 'vm1', '--repo', repoPath(), '--point', pointId, '--disk', 'vdb', '--to', folder, '--json'], env());
    assert.equal(one.status, 0, one.stderr);
    assert.deepEqual(await readdir(folder), ['vdb.raw']);
    assert.equal(await md5File(join(folder, 'vdb.raw')), md5(disks.vdb));
  });

  test('restore --all-disks of a one-disk restore point still makes the folder', async () => {
    let singleId: string;
    {
      await using repository = await openRepository(repoPath(), { password });
      singleId = (await backup(repository, 'vm2', { vda: disks.vdb })).id;
    }
    const target = join(workspace.dir, 'vm2-disks');
    const result = await runCli(['restore', 'vm2', '--repo', repoPath(), '--point', singleId, '--all-disks', '--to', target, '--quiet'], env());
    assert.equal(result.status, 0, result.stderr);
    assert.deepEqual(await readdir(target), ['vda.raw']);
    assert.equal(await md5File(join(target, 'vda.raw')), md5(disks.vdb));
  });

  test('check works on a read-only repository (read-only bind mount): exit 0, one warning line', { skip: process.getuid?.() !== 0 ? 'needs root for a read-only bind mount' : false }, async () => {
    const readOnly = join(workspace.dir, 'repo-ro');
    await mkdir(readOnly);
    await exec('mount', ['--bind', repoPath(), readOnly]);
    mounts.push(readOnly);
    await exec('mount', ['-o', 'remount,ro,bind', readOnly]);
    const warning = /^snapshift: warning: repository .*repo-ro cannot be locked \(read-only file system\): reading it without a lock$/;
    for (const args of [['check', readOnly, '--read-data'], ['check', '--repo', readOnly]]) {
      const check = await runCli(args, env());
      assert.equal(check.status, 0, `${args.join(' ')}: ${check.stdout}${check.stderr}`);
      assert.match(check.stdout, /^no errors in 2 restore point\(s\)/m);
      assert.equal(check.stderr.trim().split('\n').length, 1, check.stderr);
      assert.match(check.stderr.trim(), warning);
    }
    const info = await runCli(['repo', 'info', readOnly], env());
    assert.equal(info.status, 0, info.stderr);
    assert.match(info.stdout, /2 restore point\(s\)/);
  });

  test('a reader that closes the pipe early (snapshift … | head): no EPIPE stack, the command finishes, exit 0', async () => {
    for (const args of [['--help'], ['repo', 'info', repoPath(), '--json'], ['restore', 'vm1', '--repo', repoPath(), '--point', pointId, '--to', join(workspace.dir, 'piped'), '--json']]) {
      const result = await runWithClosedStdout(args, env());
      assert.equal(result.stderr, '', `${args.join(' ')}: ${result.stderr}`);
      assert.equal(result.status, 0, args.join(' '));
    }
    // The restore was not cut short by the closed pipe: both disks are there, whole.
    assert.equal(await md5File(join(workspace.dir, 'piped', 'vda.raw')), md5(disks.vda));
    assert.equal(await md5File(join(workspace.dir, 'piped', 'vdb.raw')), md5(disks.vdb));
  });
});

/** Runs bin/snapshift with its stdout pipe already closed by the reader, as `| head` does once it has enough. */
function runWithClosedStdout(args: string[], env: Record<string, string>): Promise<{ status: number | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn('bin/snapshift', args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    child.stdout.destroy();
    let stderr = '';
    child.stderr.on('data', (data: Buffer) => (stderr += data.toString()));
    child.on('error', reject);
    child.on('close', (status) => resolve({ status, stderr }));
  });
}
