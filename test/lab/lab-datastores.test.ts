import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { withLab } from '../../src/lab/index.ts';

const run = promisify(execFile);
const MiB = 1024 ** 2;

describe('lab datastores (withLab)', () => {
  const lab = withLab();

  test('VM disks are qcow2 with the requested random fill, the rest unallocated', async () => {
    const vm = await lab().createVm('disk1', { datastore: 'xfs', sizeBytes: 256 * MiB, fillBytes: 16 * MiB });
    assert.equal(path.dirname(vm.diskPath), lab().datastore('xfs').vmDisksDir);
    const info = JSON.parse((await run('qemu-img', ['info', '--output=json', vm.diskPath])).stdout) as { format: string; 'virtual-size': number };
    assert.equal(info.format, 'qcow2');
    assert.equal(info['virtual-size'], 256 * MiB);
    const map = JSON.parse((await run('qemu-img', ['map', '--output=json', vm.diskPath])).stdout) as Array<{ length: number; data: boolean }>;
    assert.equal(map.filter((extent) => extent.data).reduce((sum, extent) => sum + extent.length, 0), 16 * MiB);
    await assert.rejects(lab().createVm('disk1', { datastore: 'xfs', sizeBytes: MiB, fillBytes: 0 }), /already exists/);
  });

  test('the datastores take storage snapshots: btrfs snapshot of vms/, XFS reflink copy', async () => {
    const btrfs = lab().datastore('btrfs');
    await lab().createVm('disk2', { datastore: 'btrfs', sizeBytes: 64 * MiB, fillBytes: 8 * MiB });
    const snapshot = path.join(btrfs.snapshotsDir, 'snap1');
    await run('btrfs', ['subvolume', 'snapshot', '-r', btrfs.vmDisksDir, snapshot]);
    await fs.access(path.join(snapshot, 'disk2.qcow2'));
    await run('btrfs', ['subvolume', 'delete', snapshot]);

    const xfs = lab().datastore('xfs');
    await run('cp', ['--reflink=always', path.join(xfs.vmDisksDir, 'disk1.qcow2'), path.join(xfs.snapshotsDir, 'disk1.qcow2')]);
    await fs.rm(path.join(xfs.snapshotsDir, 'disk1.qcow2'));
  });
});
