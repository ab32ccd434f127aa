import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { Catalog, checkVmName } from '../../src/catalog/index.ts';
import { parseJobDefinition } from '../../src/jobs/job-definition.ts';
import { makeWorkspace, runCli } from '../support/workspace.ts';

let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
const home = () => join(workspace.dir, 'home');

before(async () => {
  workspace = await makeWorkspace('vmname');
  mkdirSync(home());
});
after(async () => {
  await workspace?.cleanup();
});

const bad = ['a,b', 'vm/1', '../etc', '.hidden', '-rf', '', 'x'.repeat(65), 'vm 1', 'vm:1', 'vm\n1', 'é'];
const good = ['vm1', 'VM_01', 'a', 'web-1.prod', '_x', '9', 'x'.repeat(64)];

test('VM names: letters, digits and ._- only, 1-64 characters, not starting with . or -', () => {
  for (const name of good) assert.equal(checkVmName(name), name);
  for (const name of bad) {
    assert.throws(() => checkVmName(name), (error: { code?: string; message?: string }) => {
      assert.equal(error.code, 'USAGE');
      assert.match(error.message!, /invalid VM name .*: use 1 to 64 letters, digits, "\.", "_" or "-", not starting with "\." or "-"/);
      return true;
    }, JSON.stringify(name));
  }
});

test('a job definition or a catalog host with such a name is refused', () => {
  assert.throws(() => parseJobDefinition({ name: 'j', vms: ['ok', 'a,b'], repository: '/r' }), /invalid job: job j: invalid VM name "a,b"/);
  assert.throws(() => parseJobDefinition({ name: 'j', vms: ['../x'], repository: '/r' }), /invalid VM name/);
  using catalog = Catalog.open(home());
  assert.throws(() => catalog.addHost({ name: 'vm/1', kind: 'qemu', qmpSocketPath: '/nowhere', nbdSocketPath: null }), /invalid VM name "vm\/1"/);
  assert.equal(catalog.listHosts().length, 0);
});

test('host add, backup and job create refuse such a name with a usage error, before touching anything', async () => {
  const env = { SNAPSHIFT_HOME: home() };
  const hostAdd = await runCli(['host', 'add', 'qemu', '--qmp', join(workspace.dir, 'no.sock'), '--name', 'vm,file=/etc/passwd'], env);
  assert.equal(hostAdd.status, 64, hostAdd.stderr);
  assert.equal(hostAdd.stderr, 'snapshift: invalid VM name "vm,file=/etc/passwd": use 1 to 64 letters, digits, ".", "_" or "-", not starting with "." or "-"\n');
  const backup = await runCli(['backup', 'vm/../../x', '--repo', join(workspace.dir, 'repo')], env);
  assert.equal(backup.status, 64, backup.stderr);
  assert.match(backup.stderr, /^snapshift: invalid VM name "vm\/..\/..\/x"/);
  const job = await runCli(['job', 'create', 'nightly', '--vm', 'ok', '--vm', '-x', '--repo', join(workspace.dir, 'repo')], env);
  assert.equal(job.status, 64, job.stderr);
  assert.match(job.stderr, /invalid job: job nightly: invalid VM name "-x"/);
  assert.ok(!existsSync(join(workspace.dir, 'repo')));
});
