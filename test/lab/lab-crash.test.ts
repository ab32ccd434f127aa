import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Lab, useSharedTestCache } from '../../src/lab/index.ts';
import { readLabState, writeLabState, type LabState } from '../../src/lab/lab-state.ts';
import { leftovers, recordedPids, snapshift, snapshiftBin } from './lab-leftovers.ts';

useSharedTestCache();

async function tempLabDir(t: { after(fn: () => Promise<void>): void }): Promise<string> {
  const parent = await fs.mkdtemp(path.join(os.tmpdir(), 'snapshift-lab-crash-'));
  const dir = path.join(parent, 'lab');
  // Whatever the test does, the lab goes down and the folder goes away.
  t.after(async () => {
    await Lab.down(dir);
    await fs.rm(parent, { recursive: true, force: true });
  });
  return dir;
}

/** Starts bin/snapshift ARGS and SIGKILLs it as soon as `ready(state)` holds for the lab's state file. */
async function killWhen(dir: string, args: string[], ready: (state: LabState) => boolean): Promise<{ state: LabState; exitedBeforeKill: boolean }> {
  const child: ChildProcess = spawn(snapshiftBin, args, { stdio: 'ignore' });
  let exited = false;
  child.once('exit', () => (exited = true));
  const deadline = Date.now() + 60_000;
  for (;;) {
    const state = await readLabState(path.join(dir, 'lab-state.json')).catch(() => undefined);
    if (state && ready(state)) {
      const exitedBeforeKill = exited;
      child.kill('SIGKILL');
      await new Promise((resolve) => (exited ? resolve(undefined) : child.once('exit', resolve)));
      return { state, exitedBeforeKill };
    }
    if (exited || Date.now() > deadline) throw new Error(`snapshift ${args.join(' ')} ended (or timed out) before the state was ready`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

test('lab up SIGKILLed half-way: lab down from the state file removes its loop devices, mounts and files', { timeout: 120_000 }, async (t) => {
  const dir = await tempLabDir(t);
  // Kill right after the first loop device is recorded: the btrfs datastore is (being) mounted, XFS not made yet.
  const { state } = await killWhen(dir, ['lab', 'up', '--dir', dir, '--size', '1G'], (s) => s.datastores.some((d) => d.loopDevice !== undefined));
  assert.ok(state.datastores.length >= 1);
  const left = await leftovers(dir);
  assert.ok(left.loops.length >= 1, 'the killed up left a loop device behind');

  // A process that is not what we started must survive down even if its PID is in the state file.
  const stranger = spawn('sleep', ['60'], { stdio: 'ignore' });
  t.after(() => void stranger.kill('SIGKILL'));
  const current = (await readLabState(path.join(dir, 'lab-state.json')))!;
  current.processes.push({ label: 'stranger', pid: stranger.pid!, cmdline: ['qemu-system-x86_64', '-name', 'not-this'], startedAt: new Date().toISOString() });
  await writeLabState(path.join(dir, 'lab-state.json'), current);

  const down = await snapshift(['lab', 'down', '--dir', dir]);
  assert.equal(down.code, 0, down.stderr);
  assert.deepEqual(await leftovers(dir, [stranger.pid!]), { mounts: [], loops: [], livePids: [stranger.pid!] });
  await assert.rejects(fs.access(dir), 'the lab folder is gone');
});

test('lab vm start SIGKILLed while its guest boots: lab down ends the QEMU it left and removes everything', { timeout: 180_000 }, async (t) => {
  const dir = await tempLabDir(t);
  const up = await snapshift(['lab', 'up', '--dir', dir, '--size', '1G']);
  assert.equal(up.code, 0, up.stderr);

  const unknown = await snapshift(['lab', 'vm', 'create', 'vm1', '--dir', dir, '--datastore', 'zfs']);
  assert.notEqual(unknown.code, 0);
  assert.equal(unknown.stderr.trim(), 'snapshift: unknown datastore "zfs" (the lab has: btrfs, xfs)');

  const created = await snapshift(['lab', 'vm', 'create', 'vm1', '--dir', dir, '--datastore', 'xfs', '--size', '128M', '--fill', '32M']);
  assert.equal(created.code, 0, created.stderr);
  const { state } = await killWhen(dir, ['lab', 'vm', 'start', 'vm1', '--dir', dir], (s) => s.processes.length > 0);
  const qemuPid = state.processes[0]!.pid;
  assert.deepEqual((await leftovers(dir, [qemuPid])).livePids, [qemuPid], 'QEMU outlives the killed start command');
  assert.deepEqual(await recordedPids(dir), [qemuPid]);

  const down = await snapshift(['lab', 'down', '--dir', dir]);
  assert.equal(down.code, 0, down.stderr);
  assert.match(down.stdout, /ended 1 process/);
  assert.deepEqual(await leftovers(dir, [qemuPid]), { mounts: [], loops: [], livePids: [] });
  await assert.rejects(fs.access(dir), 'the lab folder is gone');
});
