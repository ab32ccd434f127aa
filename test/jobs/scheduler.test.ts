import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Catalog } from '../../src/catalog/index.ts';
import { exec } from '../../src/core/exec.ts';
import { NbdClient } from '../../src/datamover/nbd/index.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { initRepository } from '../../src/repository/index.ts';
import { makeWorkspace, runCli } from '../support/workspace.ts';

const MiB = 1024 * 1024;
let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
let daemon: StorageDaemon;
const children: ChildProcess[] = [];

before(async () => {
  workspace = await makeWorkspace('sched');
  mkdirSync(join(workspace.dir, 'home'));
  const image = join(workspace.dir, 'vm.qcow2');
  await exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(16 * MiB)]);
  daemon = await StorageDaemon.start({ dir: workspace.dir, images: [{ path: image, format: 'qcow2', nodeName: 'disk0' }] });
  await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
  await nbd.write(0, Buffer.alloc(4 * MiB, 0x33));
  using catalog = Catalog.open(join(workspace.dir, 'home'));
  catalog.addHost({ name: 'sched-vm', kind: 'qemu', qmpSocketPath: daemon.qmpSocketPath, nbdSocketPath: daemon.nbdSocketPath });
  await initRepository(join(workspace.dir, 'repo'), { encryption: false });
});

after(async () => {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  await daemon?.stop();
  await workspace?.cleanup();
});

// The issue asks for "every minute"; the scheduler's clock is the same with a seconds field, and a test
// that waits minutes would cost the suite its speed. A 3-second schedule with runs that are slower than
// that shows both: it runs when due, and never twice at once.
test('the daemon runs a due job on schedule, never twice at once, and a second daemon is refused', async () => {
  const env = { ...process.env, SNAPSHIFT_HOME: join(workspace.dir, 'home') };
  const create = await runCli(['job', 'create', 'frequent', '--vm', 'sched-vm', '--repo', join(workspace.dir, 'repo'), '--mode', 'regular', '--schedule', '*/3 * * * * *', '--max-read-rate', '1'], env);
  assert.equal(create.status, 0, create.stderr);
  const child = spawn('bin/snapshift', ['daemon'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let log = '';
  child.stderr!.on('data', (chunk: Buffer) => (log += chunk.toString()));
  // Waits for what the daemon says, not for a fixed time: on a loaded machine its start alone can take seconds.
  const waitForLog = async (what: string, done: () => boolean, timeoutMs = 120_000) => {
    const deadline = Date.now() + timeoutMs;
    while (!done()) {
      if (child.exitCode !== null || Date.now() > deadline) assert.fail(`the daemon never logged ${what}; log:\n${log}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  };
  await waitForLog('its start', () => log.includes('snapshift daemon started'));
  const second = await runCli(['daemon'], env);
  assert.equal(second.status, 2);
  assert.match(second.stderr, /another snapshift daemon runs for this catalog/);
  await waitForLog('two runs and a skipped fire time', () => (log.match(/starting job frequent/g) ?? []).length >= 2 && /previous run has not ended: skipped/.test(log));
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  await exited;

  using catalog = Catalog.open(join(workspace.dir, 'home'));
  const sessions = catalog.jobs.listSessions('frequent').reverse();
  assert.ok(sessions.length >= 2, `at least two scheduled runs, got ${sessions.length}; log:\n${log}`);
  for (let index = 1; index < sessions.length; index++) {
    assert.ok(sessions[index]!.startedAt >= sessions[index - 1]!.endedAt!, 'runs never overlap');
  }
  assert.ok(sessions.every((session) => session.state === 'Success' || session.state === 'Stopped'), JSON.stringify(sessions.map((s) => s.state)));
  const jsonLog = readFileSync(join(workspace.dir, 'home', 'logs', 'daemon.log'), 'utf8').trim().split('\n').map((line) => JSON.parse(line) as { msg: string });
  assert.ok(jsonLog.some((entry) => entry.msg.startsWith('starting job frequent')), 'JSON log file records the runs');
  assert.match(log, /starting job frequent/, 'the terminal gets human lines');
  // Each run reads 4 MiB at 1 MB/s, longer than the 3 s period: the scheduler must have skipped fire times.
  assert.match(log, /job frequent is due but its previous run has not ended: skipped/);
});

test('sessions and jobs read back through the CLI; a bad job definition is a usage error', async () => {
  const env = { ...process.env, SNAPSHIFT_HOME: join(workspace.dir, 'home') };
  const list = await runCli(['session', 'list', '--json'], env);
  assert.equal(list.status, 0);
  const sessions = JSON.parse(list.stdout) as Array<{ id: string; jobName: string; state: string }>;
  assert.ok(sessions.length >= 1 && sessions.every((session) => session.jobName === 'frequent'));
  const show = await runCli(['session', 'show', sessions.at(-1)!.id.slice(0, 8)], env);
  assert.equal(show.status, 0, show.stderr);
  assert.match(show.stdout, /sched-vm: (Success|Stopped)/);
  const job = JSON.parse((await runCli(['job', 'show', 'frequent', '--json'], env)).stdout) as { vms: string[]; mode: string; maxReadRateMBps: number };
  assert.deepEqual([job.vms, job.mode, job.maxReadRateMBps], [['sched-vm'], 'regular', 1]);
  const bad = await runCli(['job', 'create', 'broken', '--vm', 'x', '--repo', '/nowhere', '--mode', 'sideways'], env);
  assert.equal(bad.status, 64);
  assert.equal(bad.stderr, 'snapshift: invalid job: job broken: mode must be storage-snapshot, regular or fleecing, not "sideways"\n');
  const unknown = await runCli(['session', 'show', 'ffffffff'], env);
  assert.equal(unknown.status, 2);
});
