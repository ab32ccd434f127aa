import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { Catalog } from '../../src/catalog/index.ts';
import { migrate } from '../../src/catalog/schema.ts';
import { makeWorkspace } from '../support/workspace.ts';

let workspace: Awaited<ReturnType<typeof makeWorkspace>>;

before(async () => {
  workspace = await makeWorkspace('migration');
});
after(async () => {
  await workspace?.cleanup();
});

/** A catalog as the previous release wrote it (schema v3): a host row was one QEMU VM. */
function writeV3Catalog(home: string): void {
  mkdirSync(home, { recursive: true });
  const db = new Database(join(home, 'catalog.sqlite'));
  try {
    migrate(db, 3);
    assert.equal(db.pragma('user_version', { simple: true }), 3);
    const addHost = db.prepare('INSERT INTO hosts (name, kind, qmp_socket, nbd_socket, qga_socket, created_at) VALUES (?, ?, ?, ?, ?, ?)');
    addHost.run('web1', 'qemu', '/run/web1/qmp.sock', null, '/run/web1/qga.sock', '2026-11-01T10:00:00.000Z');
    addHost.run('db1', 'qemu', '/run/db1/qmp.sock', '/run/db1/nbd.sock', null, '2026-11-02T10:00:00.000Z');
    db.prepare('INSERT INTO snapshot_ledger (kind, vm_name, qmp_socket, owner_pid, session_id, details, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)').run(
      'vm',
      'web1',
      '/run/web1/qmp.sock',
      999_999,
      'abcdef01-0000-4000-8000-000000000000',
      JSON.stringify({ overlays: [{ baseNodeName: 'base0', overlayNodeName: 'ov0', overlayPath: '/vms/web1-00001.qcow2' }] }),
      '2026-11-03T10:00:00.000Z',
    );
    db.prepare('INSERT INTO disks (vm_name, name, node_name, image_path, format, virtual_size, seen_at) VALUES (?, ?, ?, ?, ?, ?, ?)').run(
      'web1',
      'vda',
      'disk0',
      '/vms/web1.qcow2',
      'qcow2',
      1 << 30,
      '2026-11-03T10:00:00.000Z',
    );
  } finally {
    db.close();
  }
}

test('a v3 catalog migrates: each old host row becomes a qemu host serving one VM of the same name, nothing else changes', () => {
  const home = join(workspace.dir, 'v3');
  writeV3Catalog(home);
  using catalog = Catalog.open(home);

  assert.deepEqual(
    catalog.listHosts().map(({ createdAt: _createdAt, ...host }) => host),
    [
      { name: 'db1', kind: 'qemu', qmpSocketPath: '/run/db1/qmp.sock', nbdSocketPath: '/run/db1/nbd.sock', qgaSocketPath: null },
      { name: 'web1', kind: 'qemu', qmpSocketPath: '/run/web1/qmp.sock', nbdSocketPath: null, qgaSocketPath: '/run/web1/qga.sock' },
    ],
  );
  assert.equal(catalog.getHost('web1')?.createdAt, '2026-11-01T10:00:00.000Z', 'creation times are kept');
  assert.deepEqual(
    catalog.listVms().map(({ createdAt: _createdAt, ...vm }) => vm),
    [
      { name: 'db1', hostName: 'db1', ref: 'db1', uuid: null },
      { name: 'web1', hostName: 'web1', ref: 'web1', uuid: null },
    ],
  );
  const web1 = catalog.getVm('web1');
  assert.equal(web1?.host.kind, 'qemu');
  assert.equal(web1?.host.kind === 'qemu' ? web1.host.qmpSocketPath : undefined, '/run/web1/qmp.sock');

  // The old ledger row names no host; the hunter still reaches the VM through the QMP socket it carries.
  const [entry] = catalog.listVmSnapshotLedger();
  assert.equal(entry?.vmName, 'web1');
  assert.equal(entry?.hostName, null);
  assert.equal(entry?.qmpSocketPath, '/run/web1/qmp.sock');
  assert.deepEqual(entry?.overlays, [{ baseNodeName: 'base0', overlayNodeName: 'ov0', overlayPath: '/vms/web1-00001.qcow2' }]);

  // A libvirt host now lives beside them, serving several VMs; names stay unique across hosts.
  catalog.addHost({ name: 'kvm1', kind: 'libvirt', uri: 'qemu+ssh://root@kvm1/system' });
  catalog.addVm({ name: 'mail', hostName: 'kvm1', ref: 'mail', uuid: '0b3a6c1e-0000-4000-8000-000000000001' });
  catalog.addVm({ name: 'files', hostName: 'kvm1', ref: 'files', uuid: null });
  assert.deepEqual(catalog.listVms('kvm1').map((vm) => vm.name), ['files', 'mail']);
  assert.throws(() => catalog.addVm({ name: 'web1', hostName: 'kvm1', ref: 'web1', uuid: null }), /already registered on host web1/);
  assert.equal(catalog.removeHost('kvm1'), true);
  assert.deepEqual(catalog.listVms().map((vm) => vm.name), ['db1', 'web1'], "removing a host forgets its VMs, not the others'");
});

test('opening a migrated catalog again changes nothing', () => {
  const home = join(workspace.dir, 'v3');
  using catalog = Catalog.open(home);
  assert.deepEqual(catalog.listVms().map((vm) => vm.name), ['db1', 'web1']);
});
