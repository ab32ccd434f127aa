import { test } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { snapshift } from './lab-leftovers.ts';

async function emptyParent(t: { after(fn: () => Promise<void>): void }): Promise<string> {
  const parent = await fs.mkdtemp(path.join(os.tmpdir(), 'snapshift-lab-bad-'));
  // World-writable, so an unprivileged `lab up` could make its folder here: the test shows it does not.
  await fs.chmod(parent, 0o777);
  t.after(() => fs.rm(parent, { recursive: true, force: true }));
  return parent;
}

/** One line on stderr, starting with "snapshift: ". */
function oneLine(stderr: string): string {
  const lines = stderr.trim().split('\n');
  assert.equal(lines.length, 1, `one line expected, got: ${stderr}`);
  assert.match(lines[0]!, /^snapshift: /);
  return lines[0]!;
}

test('lab up as non-root: one line saying root is needed, exit 2, nothing made', async (t) => {
  const parent = await emptyParent(t);
  const result = await snapshift(['lab', 'up', '--dir', path.join(parent, 'lab')], { wrapper: ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'] });
  assert.equal(result.code, 2);
  assert.match(oneLine(result.stderr), /missing: root \(lab up attaches loop devices and mounts filesystems; run it as root\)/);
  assert.deepEqual(await fs.readdir(parent), []);
});

test('lab up without loop devices: one line naming the missing loop-control device, exit 2, nothing made', async (t) => {
  const parent = await emptyParent(t);
  // SNAPSHIFT_LAB_LOOP_CONTROL is the check's test hook (src/lab/lab-preflight.ts).
  const result = await snapshift(['lab', 'up', '--dir', path.join(parent, 'lab')], { env: { SNAPSHIFT_LAB_LOOP_CONTROL: '/nonexistent/loop-control' } });
  assert.equal(result.code, 2);
  assert.match(oneLine(result.stderr), /missing: loop devices \(\/nonexistent\/loop-control does not exist/);
  assert.deepEqual(await fs.readdir(parent), []);
});

test('lab vm create on an unknown datastore, bad sizes, unknown VMs: clear one-line errors', async (t) => {
  const parent = await emptyParent(t);
  const dir = path.join(parent, 'lab');
  const unknownDatastore = await snapshift(['lab', 'vm', 'create', 'vm1', '--dir', dir, '--datastore', 'ntfs']);
  assert.equal(unknownDatastore.code, 64);
  assert.equal(oneLine(unknownDatastore.stderr), 'snapshift: unknown datastore "ntfs" (the lab has: btrfs, xfs)');

  const badSize = await snapshift(['lab', 'up', '--dir', dir, '--size', 'huge']);
  assert.equal(badSize.code, 64);
  assert.match(oneLine(badSize.stderr), /--size "huge" is not a size/);

  const noLab = await snapshift(['lab', 'vm', 'start', 'vm1', '--dir', dir]);
  assert.equal(noLab.code, 2);
  assert.match(oneLine(noLab.stderr), /no lab is up in .*lab up/);

  const status = await snapshift(['lab', 'status', '--dir', dir, '--json']);
  assert.equal(status.code, 0);
  assert.equal((JSON.parse(status.stdout) as { up: boolean }).up, false);
  assert.deepEqual(await fs.readdir(parent), []);
});
