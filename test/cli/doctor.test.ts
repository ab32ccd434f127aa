// snapshift doctor on this (set-up) machine, and on the same machine with one piece taken away: a program hidden
// from PATH, or a qemu-storage-daemon that finds no QEMU modules. Nothing is uninstalled: the missing piece is
// made by a folder of links that stands in for PATH.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { constants } from 'node:fs';
import { access, chmod, copyFile, mkdir, readFile, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { checks, features, type DoctorReport } from '../../src/doctor/index.ts';
import { makeWorkspace, runCli } from '../support/workspace.ts';

/** Every program a check looks for, plus what bin/snapshift and scripts/run-tests.sh themselves run. */
const programNames = [
  ...checks.flatMap((check) => (check.probe.kind === 'program' ? [check.probe.program] : [])),
  'node', 'bash', 'find', 'sort', 'tail', 'dirname',
];

/** Where `program` is on this machine (PATH, then the sbin folders). */
async function locate(program: string): Promise<string> {
  for (const folder of [...(process.env['PATH'] ?? '').split(':'), '/usr/local/sbin', '/usr/sbin', '/sbin']) {
    if (folder === '') continue;
    const candidate = join(folder, program);
    if (await access(candidate, constants.X_OK).then(() => true, () => false)) return candidate;
  }
  throw new Error(`${program} is not on this machine; run bash scripts/setup.sh`);
}

describe('snapshift doctor', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  before(async () => {
    workspace = await makeWorkspace('doctor');
  });
  after(async () => {
    await workspace?.cleanup();
  });

  /**
   * A folder to use as the whole PATH: a link to every program doctor and our scripts look for, except `hide`;
   * `copy` is copied instead of linked (a QEMU binary copied elsewhere looks for its modules beside itself).
   */
  async function pathWithout(name: string, options: { hide?: string; copy?: string }): Promise<string> {
    const folder = join(workspace.dir, name);
    await mkdir(folder);
    for (const program of new Set(programNames)) {
      if (program === options.hide) continue;
      const real = await locate(program);
      if (program === options.copy) {
        await copyFile(real, join(folder, program));
        await chmod(join(folder, program), 0o755);
      } else {
        await symlink(real, join(folder, program));
      }
    }
    return folder;
  }

  const parse = (stdout: string) => JSON.parse(stdout) as DoctorReport;

  test('on this set-up machine every check the tests need passes, exit 0; --json lists every check', async () => {
    const human = await runCli(['doctor', '--for', 'tests']);
    assert.equal(human.status, 0, human.stdout + human.stderr);
    assert.match(human.stdout, /^doctor: all \d+ required checks pass for tests/m);
    assert.match(human.stdout, /^ok +QEMU block driver rbd +qemu-block-extra +required/m);

    const json = await runCli(['doctor', '--for', 'tests', '--json']);
    assert.equal(json.status, 0, json.stderr);
    const report = parse(json.stdout);
    assert.equal(report.ok, true);
    assert.deepEqual(report.checks.map((check) => check.id), checks.map((check) => check.id), 'every check, in order');
    assert.deepEqual(report.checks.filter((check) => check.required && !check.found), []);
    assert.deepEqual(new Set(report.requiredFeatures), new Set(Object.keys(features).filter((feature) => feature !== 'bench')));
    // KVM has a fallback (TCG): reported, never required.
    assert.equal(report.checks.find((check) => check.id === 'device:/dev/kvm')!.required, false);
  });

  test('a program hidden from PATH is MISSING with its package, required only where a feature asked for needs it', async () => {
    const PATH = await pathWithout('no-nbdinfo', { hide: 'nbdinfo' });
    const forTests = await runCli(['doctor', '--for', 'tests'], { PATH });
    assert.equal(forTests.status, 2, forTests.stdout + forTests.stderr);
    assert.match(forTests.stdout, /^MISSING +nbdinfo +libnbd-bin +required \(tests\) +not found on PATH; without it: /m);
    assert.match(forTests.stdout, /^doctor: 1 required check\(s\) missing for tests.*apt-get install libnbd-bin/m);

    const report = parse((await runCli(['doctor', '--for', 'tests', '--json'], { PATH })).stdout);
    assert.deepEqual(report.checks.filter((check) => !check.found && check.required).map((check) => check.id), ['program:nbdinfo'], 'nothing else is missing');

    const forEngine = await runCli(['doctor'], { PATH });
    assert.equal(forEngine.status, 0, 'the engine does not need nbdinfo');
    assert.match(forEngine.stdout, /^MISSING +nbdinfo +libnbd-bin +optional \(tests\)/m);
  });

  test("a QEMU that finds no block-rbd.so: the rbd driver is MISSING and qemu-block-extra is named; qcow2 and raw are built in", async () => {
    const PATH = await pathWithout('no-qemu-modules', { copy: 'qemu-storage-daemon' });
    const forRbd = await runCli(['doctor', '--for', 'ceph-rbd'], { PATH });
    assert.equal(forRbd.status, 2, forRbd.stdout + forRbd.stderr);
    assert.match(forRbd.stdout, /^MISSING +QEMU block driver rbd +qemu-block-extra +required \(ceph-rbd, lab-ceph\) +.*Unknown driver 'rbd'/m);
    assert.match(forRbd.stdout, /apt-get install qemu-block-extra/);

    const report = parse((await runCli(['doctor', '--for', 'ceph-rbd', '--json'], { PATH })).stdout);
    const byId = new Map(report.checks.map((check) => [check.id, check]));
    assert.equal(byId.get('qemu-block-driver:rbd')!.found, false);
    assert.equal(byId.get('qemu-block-driver:qcow2')!.found, true);
    assert.equal(byId.get('qemu-block-driver:raw')!.found, true);

    assert.equal((await runCli(['doctor'], { PATH })).status, 0, 'the rbd driver is optional for the engine core');
  });

  test('scripts/run-tests.sh starts with doctor: with a program missing it runs no test and prints the report', async () => {
    const PATH = await pathWithout('run-tests-no-qemu-io', { hide: 'qemu-io' });
    const emptyRoot = join(workspace.dir, 'no-tests-here');
    await mkdir(emptyRoot);
    const { spawnSync } = await import('node:child_process');
    const run = spawnSync('bash', ['scripts/run-tests.sh', emptyRoot], { env: { ...process.env, PATH }, encoding: 'utf8' });
    assert.equal(run.status, 2, run.stdout + run.stderr);
    assert.match(run.stderr, /^MISSING +qemu-io +qemu-utils +required/m);
    assert.match(run.stderr, /run-tests: this machine lacks what the tests need/);
    assert.doesNotMatch(run.stdout + run.stderr, /no test files/, 'it stopped before looking for tests');
  });

  test('scripts/setup.sh installs every Debian package doctor names', async () => {
    const setup = await readFile('scripts/setup.sh', 'utf8');
    const list = /^APT_PACKAGES=\(\n([\s\S]*?)\n\)/m.exec(setup)?.[1];
    assert.ok(list, 'APT_PACKAGES=( … ) in scripts/setup.sh');
    const installed = new Set(list.split('\n').flatMap((line) => line.replace(/#.*/, '').trim().split(/\s+/)).filter((name) => name !== ''));
    const named = new Set(checks.flatMap((check) => (check.debianPackage ? [check.debianPackage] : [])));
    assert.deepEqual([...named].filter((name) => !installed.has(name)), []);
  });

  test('--for with an unknown feature is a usage error', async () => {
    const result = await runCli(['doctor', '--for', 'engine,warp-drive']);
    assert.equal(result.status, 64);
    assert.match(result.stderr, /unknown feature "warp-drive"/);
  });
});
