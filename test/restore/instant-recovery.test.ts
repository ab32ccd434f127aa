// Instant recovery (issue 13 part 3) of real TCG lab guests: booted from their restore point in seconds at
// 2 GiB and 16 GiB, writing normally; what the guest then sees is the backup plus its own writes (md5 inside
// the guest against the restored disk under its overlay); migrated to a datastore while it writes; a dead
// NBD server pauses the guest, never feeds it wrong data, and `resume` brings it back.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, mkdir, readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { exec } from '../../src/core/exec.ts';
import { pathExists } from '../../src/core/fs-probe.ts';
import { readCmdline, sleep, waitForExit } from '../../src/core/owned-process.ts';
import { QmpClient } from '../../src/hypervisor/qemu/qmp-client.ts';
import { withLab, parseGuestConsole } from '../../src/lab/index.ts';
import { readGuestConsole, readGuestHeartbeats } from '../../src/lab/guest-console.ts';
import { sendGuestControl } from '../../src/lab/guest-control.ts';
import { initRepository } from '../../src/repository/index.ts';
import { makeWorkspace, md5File, md5OfImage, runCli } from '../support/workspace.ts';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const password = 'instant';

interface Recovery {
  name: string;
  restorePoint: string;
  qemuPid: number;
  serverPid: number;
  qmpSocket: string;
  startMs: number;
  consoleLog: string;
  disks: Array<{ name: string; overlay: string }>;
}

describe('instant recovery of lab guests', () => {
  const lab = withLab();
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  const env = () => ({ SNAPSHIFT_HOME: join(workspace.dir, 'home'), SNAPSHIFT_PASSWORD: password, SNAPSHIFT_REPOSITORY: join(workspace.dir, 'repo') });
  const cli = async (args: string[]) => {
    const result = await runCli(args, env());
    assert.equal(result.status, 0, `snapshift ${args.join(' ')}: ${result.stderr}`);
    return result.stdout;
  };
  /** Backed-up source VMs: name -> the md5 of its restore point's disk (restored the ordinary way) and that raw copy. */
  const sources = new Map<string, { restoredRaw: string; md5: string; pointId: string }>();

  before(async () => {
    workspace = await makeWorkspace('ir');
    await mkdir(join(workspace.dir, 'home'));
    await initRepository(join(workspace.dir, 'repo'), { password, encryption: true });
    for (const [name, sizeBytes] of [['small', 256 * MiB], ['g2', 2 * GiB], ['g16', 16 * GiB]] as const) {
      await lab().createVm(name, { datastore: 'btrfs', sizeBytes, fillBytes: 32 * MiB });
      const vm = await lab().startVm(name, { rateMiBps: 1 });
      await vm.waitForHeartbeats(2, 30_000);
      await cli(['host', 'add', 'qemu', '--qmp', vm.qmpSocketPath, '--name', name]);
      await cli(['backup', name, '--mode', 'storage-snapshot', '--json']);
      await vm.kill();
      if (name === 'small') {
        const restoredRaw = join(workspace.dir, `${name}-restored.raw`);
        await cli(['restore', name, '--to', restoredRaw, '--quiet']);
        const points = JSON.parse(await cli(['restore-points', name, '--json'])) as Array<{ id: string }>;
        sources.set(name, { restoredRaw, md5: await md5File(restoredRaw), pointId: points.at(-1)!.id });
      }
    }
  });
  after(async () => {
    // Whatever a failed test left running.
    for (const name of await readdir(join(workspace.dir, 'home', 'instant-recovery')).catch(() => [] as string[])) await runCli(['instant-recovery', 'stop', name], env());
    await workspace?.cleanup();
  });

  const start = async (vm: string, name: string): Promise<Recovery> =>
    JSON.parse(await cli(['instant-recovery', 'start', vm, '--name', name, ...(sources.has(vm) ? ['--point', sources.get(vm)!.pointId] : []), '--json'])) as Recovery;
  const waitForConsole = async (path: string, what: (text: string) => boolean, timeoutMs: number, why: string) => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const text = await readGuestConsole(path);
      if (what(text)) return text;
      if (Date.now() > deadline) assert.fail(`${why} within ${timeoutMs} ms; console: ${text.slice(-400)}`);
      await sleep(100);
    }
  };
  /** The guest's md5 of its whole disk once it stopped writing (it powers off after). */
  const stopGuest = async (recovery: Recovery, timeoutMs = 180_000) => {
    await sendGuestControl(join(recovery.qmpSocket, '..', 'serial1.sock'), 'STOP');
    const text = await waitForConsole(recovery.consoleLog, (console) => /LAB: MD5 /.test(console), timeoutMs, 'the guest printed no md5');
    const md5 = parseGuestConsole(text).find((event) => event.kind === 'md5');
    // It powers off after the md5: wait for QEMU to close its images before reading them.
    assert.ok(await waitForExit(recovery.qemuPid, 60_000), 'QEMU did not exit after the guest powered off');
    return md5?.kind === 'md5' ? md5.md5 : assert.fail('no md5 event');
  };
  /** What the guest must see: the restore point's disk (restored the ordinary way) under the recovery's overlay. */
  const expectedMd5 = async (recovery: Recovery) => {
    const overlay = join(workspace.dir, `${recovery.name}-overlay.qcow2`);
    await copyFile(recovery.disks[0]!.overlay, overlay);
    await exec('qemu-img', ['rebase', '-u', '-F', 'raw', '-b', sources.get('small')!.restoredRaw, overlay]);
    return md5OfImage(overlay, 'qcow2', workspace.dir);
  };
  const assertNothingLeft = async (recovery: Recovery) => {
    assert.equal(await readCmdline(recovery.qemuPid), undefined, 'QEMU still runs');
    assert.equal(await readCmdline(recovery.serverPid), undefined, 'the NBD server still runs');
    assert.equal(await pathExists(join(workspace.dir, 'home', 'instant-recovery', recovery.name)), false, 'its folder is left');
  };

  for (const vm of ['g2', 'g16']) {
    test(`${vm}: boots from the backup to its workload at once and writes normally; stop discards it`, async (t) => {
      const commandStarted = Date.now();
      const recovery = await start(vm, `${vm}-ir`);
      const text = await waitForConsole(recovery.consoleLog, (console) => console.includes('WORKLOAD_START'), 60_000, 'the guest did not reach its workload');
      const toWorkloadMs = Date.now() - commandStarted;
      const workloadStart = parseGuestConsole(text).find((event) => event.kind === 'workload-start');
      const guestBootS = workloadStart?.kind === 'workload-start' ? workloadStart.uptimeS : NaN;
      // Speed is reported, not asserted (a loaded machine): the bar (<= 5 s) is in the closing note.
      t.diagnostic(`${vm}: workload ${toWorkloadMs} ms after the command; of it the guest's own (TCG) boot ${(guestBootS * 1000).toFixed(0)} ms, start inside the command ${recovery.startMs} ms`);
      await waitForConsole(recovery.consoleLog, (text) => (text.match(/LAB: HB /g) ?? []).length >= 3, 30_000, 'fewer than 3 heartbeats');
      const beats = await readGuestHeartbeats(recovery.consoleLog);
      assert.ok(beats.at(-1)!.writes > 0, 'the guest wrote');
      assert.equal(beats.at(-1)!.errors, 0, 'no write failed');
      const listed = JSON.parse(await cli(['instant-recovery', 'list', '--json'])) as Array<{ name: string; vmRunning: boolean; serverRunning: boolean }>;
      assert.deepEqual(listed.filter((entry) => entry.name === `${vm}-ir`).map((entry) => [entry.vmRunning, entry.serverRunning]), [[true, true]]);
      await cli(['instant-recovery', 'stop', `${vm}-ir`]);
      await assertNothingLeft(recovery);
    });
  }

  test('the guest sees exactly the backup plus its own writes', async () => {
    const recovery = await start('small', 'small-ir');
    await waitForConsole(recovery.consoleLog, (text) => (text.match(/LAB: HB /g) ?? []).length >= 2, 60_000, 'fewer than 2 heartbeats');
    const guestMd5 = await stopGuest(recovery);
    assert.equal(guestMd5, await expectedMd5(recovery));
    // The VM powered off: its server goes too, so the repository is not held for a VM that no longer runs.
    assert.ok(await waitForExit(recovery.serverPid, 30_000), 'the NBD server outlived its VM');
    // What is left (its overlay) the hunter removes, as it would after a host reboot.
    const hunted = JSON.parse(await cli(['hunt', '--json'])) as { instantRecoveries: Array<{ name: string; action: string }> };
    assert.deepEqual(hunted.instantRecoveries.map((action) => [action.name, action.action]), [['small-ir', 'removed-recovery']]);
    await assertNothingLeft(recovery);
  });

  test('a dead NBD server pauses the guest (no wrong data); resume serves again and the guest goes on', async () => {
    const recovery = await start('small', 'small-dead');
    await waitForConsole(recovery.consoleLog, (text) => (text.match(/LAB: HB /g) ?? []).length >= 2, 60_000, 'fewer than 2 heartbeats');
    process.kill(recovery.serverPid, 'SIGKILL');
    // The md5 after STOP reads the whole disk: those reads reach the server that is gone.
    await sendGuestControl(join(recovery.qmpSocket, '..', 'serial1.sock'), 'STOP');
    const deadline = Date.now() + 90_000;
    let status = '';
    while (Date.now() < deadline) {
      await using qmp = await QmpClient.connect(recovery.qmpSocket, { timeoutMs: 5_000 });
      status = (await qmp.execute<{ status: string }>('query-status')).status;
      if (status === 'io-error') break;
      await sleep(500);
    }
    assert.equal(status, 'io-error', 'the guest paused on the failed read');
    assert.doesNotMatch(await readGuestConsole(recovery.consoleLog), /LAB: MD5 /, 'no md5 from a disk that could not be read');
    const listed = JSON.parse(await cli(['instant-recovery', 'list', '--json'])) as Array<{ name: string; serverRunning: boolean; vmStatus: string }>;
    assert.deepEqual(listed.filter((entry) => entry.name === 'small-dead').map((entry) => [entry.serverRunning, entry.vmStatus]), [[false, 'io-error']]);
    await cli(['instant-recovery', 'resume', 'small-dead']);
    const text = await waitForConsole(recovery.consoleLog, (console) => /LAB: MD5 /.test(console), 180_000, 'the guest printed no md5 after resume');
    const md5 = parseGuestConsole(text).find((event) => event.kind === 'md5');
    assert.ok(await waitForExit(recovery.qemuPid, 60_000), 'QEMU did not exit after the guest powered off');
    assert.equal(md5?.kind === 'md5' ? md5.md5 : '', await expectedMd5(recovery));
    await cli(['instant-recovery', 'stop', 'small-dead']);
  });

  test('migrate moves the running guest to a datastore; it keeps writing there and nothing is served any more', async () => {
    const recovery = await start('small', 'small-mig');
    await waitForConsole(recovery.consoleLog, (text) => (text.match(/LAB: HB /g) ?? []).length >= 2, 60_000, 'fewer than 2 heartbeats');
    const datastore = join(workspace.dir, 'datastore');
    const migrated = JSON.parse(await cli(['instant-recovery', 'migrate', 'small-mig', '--to-datastore', datastore, '--json'])) as { disks: Array<{ path: string }>; launchUnit: { startScript: string } };
    assert.equal(await readCmdline(recovery.serverPid), undefined, 'the server stopped after the pivot');
    assert.notEqual(await readCmdline(recovery.qemuPid), undefined, 'the VM still runs');
    const beatsAtPivot = (await readGuestHeartbeats(recovery.consoleLog)).length;
    await waitForConsole(recovery.consoleLog, (text) => (text.match(/LAB: HB /g) ?? []).length >= beatsAtPivot + 2, 30_000, 'no heartbeats after the pivot');
    const guestMd5 = await stopGuest(recovery);
    assert.equal(guestMd5, await md5OfImage(migrated.disks[0]!.path, 'qcow2', workspace.dir), 'the migrated disk is what the guest saw');
    assert.ok(await pathExists(migrated.launchUnit.startScript));
    const vms = JSON.parse(await cli(['vm', 'list', '--json'])) as Array<{ name: string }>;
    assert.ok(vms.some((entry) => entry.name === 'small-mig'), 'the migrated VM is registered');
    assert.deepEqual(JSON.parse(await cli(['instant-recovery', 'list', '--json'])), []);
  });

  test('verify-boot passes on the console marker, fails without it, and leaves nothing behind either way', async () => {
    const passed = JSON.parse(await cli(['verify-boot', 'small', '--marker', 'LAB: WORKLOAD_START', '--timeout', '120', '--json'])) as { passed: boolean; bootMs: number; method: string };
    assert.equal(passed.passed, true);
    assert.equal(passed.method, 'console-marker');
    assert.ok(passed.bootMs > 0);
    const failed = await runCli(['verify-boot', 'small', '--marker', 'NEVER PRINTED', '--timeout', '30', '--json'], env());
    assert.equal(failed.status, 2, failed.stderr);
    const verdict = JSON.parse(failed.stdout) as { passed: boolean; detail: string; consoleTail: string };
    assert.equal(verdict.passed, false);
    assert.match(verdict.detail, /no \/NEVER PRINTED\/ on the console/);
    assert.match(verdict.consoleTail, /LAB: /, 'the console tail is reported');
    assert.match(failed.stderr, /BOOT_VERIFICATION_FAILED|did not boot/);
    assert.deepEqual(JSON.parse(await cli(['instant-recovery', 'list', '--json'])), []);
    assert.deepEqual((await readdir(join(workspace.dir, 'home', 'run', 'vms'))).filter((name) => name.includes('-verify-')), [], 'no VM run folder left');
  });

  test('a job with verifyBoot boots each new restore point and records the verdict in its session', async () => {
    const vm = await lab().startVm('small', { rateMiBps: 1 });
    try {
      await vm.waitForHeartbeats(2, 30_000);
      await cli(['host', 'add', 'qemu', '--qmp', vm.qmpSocketPath, '--name', 'small']);
      await cli(['job', 'create', 'verified', '--vm', 'small', '--repo', join(workspace.dir, 'repo'), '--verify-boot-marker', 'LAB: WORKLOAD_START', '--verify-boot-timeout', '120']);
      const run = JSON.parse(await cli(['job', 'run', 'verified', '--json'])) as { sessionId: string; state: string; tasks: Array<{ state: string; bootVerification?: { passed: boolean; bootMs: number } }> };
      assert.equal(run.state, 'Success');
      assert.equal(run.tasks[0]!.bootVerification?.passed, true);
      const session = JSON.parse(await cli(['session', 'show', run.sessionId, '--json'])) as { tasks: Array<{ stats: { bootVerification?: { passed: boolean } } }> };
      assert.equal(session.tasks[0]!.stats.bootVerification?.passed, true, 'the verdict is in the session');
    } finally {
      await vm.kill();
    }
    assert.deepEqual(JSON.parse(await cli(['instant-recovery', 'list', '--json'])), []);
  });

  test('restore vm re-creates a runnable QEMU VM beside the original: backed-up disks, new UUID, a launch unit, registered for backup', async () => {
    const datastore = join(workspace.dir, 'restored-vms');
    await mkdir(datastore);
    const restored = JSON.parse(await cli(['restore', 'vm', 'small', '--point', sources.get('small')!.pointId, '--to-datastore', datastore, '--name', 'small-copy', '--json', '--quiet'])) as {
      kind: string;
      uuid: string;
      disks: Array<{ name: string; path: string }>;
      launchUnit: { startScript: string; qmpSocketPath: string };
      started: boolean;
    };
    assert.equal(restored.kind, 'qemu');
    assert.equal(restored.started, false);
    assert.equal(await md5OfImage(restored.disks[0]!.path, 'qcow2', workspace.dir), sources.get('small')!.md5, 'the restored disk is the backup');
    const runDir = join(restored.launchUnit.qmpSocketPath, '..');
    const qemuPid = async () => Number((await readFile(join(runDir, 'qemu.pid'), 'utf8').catch(() => '0')).trim());
    try {
      await exec('sh', [restored.launchUnit.startScript]);
      const pid = await qemuPid();
      await waitForConsole(join(runDir, 'console.log'), (text) => (text.match(/LAB: HB /g) ?? []).length >= 2, 60_000, 'the restored VM did not reach its workload');
      {
        await using qmp = await QmpClient.connect(restored.launchUnit.qmpSocketPath, { timeoutMs: 5_000 });
        assert.equal((await qmp.execute<{ UUID: string }>('query-uuid')).UUID, restored.uuid, 'it runs with its new UUID');
      }
      const backup = JSON.parse(await cli(['backup', 'small-copy', '--mode', 'regular', '--json'])) as { tasks?: unknown };
      assert.ok(backup, 'the restored VM backs up like any other');
      await sendGuestControl(join(runDir, 'serial1.sock'), 'STOP');
      const text = await waitForConsole(join(runDir, 'console.log'), (console) => /LAB: MD5 /.test(console), 120_000, 'no md5 from the restored VM');
      assert.ok(await waitForExit(pid, 60_000));
      const md5 = parseGuestConsole(text).find((event) => event.kind === 'md5');
      assert.equal(md5?.kind === 'md5' ? md5.md5 : '', await md5OfImage(restored.disks[0]!.path, 'qcow2', workspace.dir), 'the guest ran on the restored disk');
    } finally {
      // Whatever failed, the VM start.sh started does not outlive the test.
      const pid = await qemuPid();
      if (pid > 0 && (await readCmdline(pid))?.some((arg) => arg.includes(restored.launchUnit.qmpSocketPath))) process.kill(pid, 'SIGKILL');
    }
    const again = await runCli(['restore', 'vm', 'small', '--to-datastore', datastore, '--name', 'small-copy'], env());
    assert.equal(again.status, 2, 'a second restore onto the same folder is refused');
    assert.match(again.stderr, /not empty|already registered/);
  });
});
