// Issue 12's bar: a libvirt domain writing 4 MiB/s, backed up in all three processing modes, full and
// incremental, each restore bit-exact to its point in time. On the lab's own libvirtd with the tiny guest under
// TCG, its qcow2 disk (libvirt keeps checkpoint bitmaps in qcow2 only) on the lab's btrfs datastore (so
// storage-snapshot mode takes a real btrfs snapshot). The point in time: the test pauses the domain just before
// the VM snapshot (or the fleecing start), has QEMU flush the image (its qcow2 metadata cache) and converts it
// to raw, then resumes the guest once the point in time is held; the guest writes through the whole copy.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { Catalog } from '../../src/catalog/index.ts';
import { exec } from '../../src/core/exec.ts';
import { Virsh } from '../../src/hypervisor/libvirt/virsh.ts';
import { LabDomain, labGuestBoot } from '../../src/lab/lab-libvirt-domain.ts';
import { LabLibvirt } from '../../src/lab/lab-libvirt.ts';
import { useSharedTestCache, withLab } from '../../src/lab/with-lab.ts';
import { runBackup, type ProcessingMode } from '../../src/processing/backup-run.ts';
import { initRepository, openRepository, type Repository } from '../../src/repository/index.ts';
import { restoreDisk } from '../../src/restore/disk-restore.ts';
import { makeWorkspace, md5File } from '../support/workspace.ts';

const MiB = 1024 * 1024;
const diskSizeBytes = 512 * MiB;
const domainName = 'lv-modes';
const missing = ['/usr/sbin/libvirtd', '/usr/sbin/virtlogd', '/usr/bin/virsh'].filter((program) => !existsSync(program));
const skip = process.getuid?.() !== 0 ? 'needs root (a privileged libvirtd)' : missing.length > 0 ? `libvirt is not installed (${missing.join(', ')})` : false;

// Datastores first: the lab libvirtd runs in its own mount namespace, which sees only what was mounted before.
const lab = skip ? () => undefined as never : withLab();

describe('a libvirt domain writing 4 MiB/s, in all three modes, full and incremental', { skip }, () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let libvirt: LabLibvirt | undefined;
  let virsh: Virsh;
  let domain: LabDomain | undefined;
  let catalog: Catalog;
  let repository: Repository;
  let diskPath: string;

  before(async () => {
    workspace = await makeWorkspace('libvirt-modes');
    diskPath = join(lab().datastore('btrfs').vmDisksDir, `${domainName}.qcow2`);
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', diskPath, String(diskSizeBytes)]);
    // Data here and there, so a full backup reads something and holes stay holes.
    await exec('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 8M 24M', diskPath]);
    libvirt = await LabLibvirt.start({ dir: join(workspace.dir, 'libvirt') });
    virsh = new Virsh(libvirt.uri);
    domain = await LabDomain.start(virsh, {
      name: domainName,
      disks: [{ path: diskPath, format: 'qcow2' }],
      runDir: join(workspace.dir, 'dom'),
      guest: await labGuestBoot(useSharedTestCache()),
      rateMiBps: 4,
    });
    await domain.waitForHeartbeats(2);
    await exec('mkdir', ['-p', join(workspace.dir, 'home')]);
    catalog = Catalog.open(join(workspace.dir, 'home'));
    catalog.addHost({ name: 'lab-libvirt', kind: 'libvirt', uri: libvirt.uri });
    catalog.addVm({ name: domainName, hostName: 'lab-libvirt', ref: domainName, uuid: domain.uuid });
    await initRepository(join(workspace.dir, 'repo'), { password: 'test-password', encryption: true });
    repository = await openRepository(join(workspace.dir, 'repo'), { password: 'test-password' });
  });

  after(async () => {
    await repository?.close();
    catalog?.close();
    await domain?.destroy().catch(() => undefined);
    if (libvirt) await LabLibvirt.stopIn(libvirt.dir);
    await workspace?.cleanup();
  });

  const backups: Array<{ mode: ProcessingMode; full: boolean }> = [
    { mode: 'regular', full: true },
    { mode: 'regular', full: false },
    { mode: 'storage-snapshot', full: true },
    { mode: 'storage-snapshot', full: false },
    { mode: 'fleecing', full: true },
    { mode: 'fleecing', full: false },
  ];

  for (const [index, { mode, full }] of backups.entries()) {
    test(`${mode}, ${full ? 'full' : 'incremental'}: restores bit-exact to its point in time while the guest writes`, async (t) => {
      const reference = join(workspace.dir, `reference-${index}.raw`);
      const guest = domain!;
      const before = (await guest.heartbeats()).at(-1)!;
      const run = await runBackup({
        vms: [catalog.getVm(domainName)!],
        mode,
        full,
        failoverToRegular: false,
        repository,
        catalog,
        runDir: join(workspace.dir, 'run'),
        hooks: {
          // Paused and flushed, the image holds exactly what the guest wrote.
          beforeVmSnapshots: async () => {
            await virsh.run(['suspend', domainName]);
            await virsh.run(['qemu-monitor-command', domainName, '--hmp', 'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "flush"']);
            await exec('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', diskPath, reference]);
          },
          afterVmSnapshots: async () => {
            await virsh.run(['resume', domainName]);
          },
        },
      });
      const outcome = run.outcomes[0]!;
      assert.equal(outcome.error, undefined, outcome.error?.stack);
      const { restorePoint, stats } = outcome.result!;
      assert.equal(stats.mode, mode);
      const [disk] = stats.disks;
      if (full) assert.equal(disk?.cbtSource, 'none', 'a full backup reads the whole disk');
      else {
        assert.notEqual(disk?.cbtSource, 'none', `an incremental uses libvirt's checkpoints (${disk?.fallbackReason})`);
        // The guest writes 64 KiB blocks at random offsets: what changed is a fraction of the disk (rounded to
        // 1 MiB chunks, the read is more).
        assert.ok((disk?.dirtyBytes ?? diskSizeBytes) < diskSizeBytes / 2, `an incremental reads what changed, not ${disk?.dirtyBytes} bytes`);
      }
      if (mode === 'fleecing') assert.equal(stats.deltaBytesAtCommit + stats.commitMs, 0, 'fleecing: no delta, no commit');

      const reader = await repository.openRestorePoint(restorePoint.id);
      const restored = join(workspace.dir, `restored-${index}.raw`);
      await restoreDisk(reader, disk!.name, restored, { format: 'raw', force: true, chunkSizeBytes: repository.chunkSizeBytes });
      assert.equal(await md5File(restored), await md5File(reference), 'the restore equals the disk at the point in time');

      // The guest wrote on through the backup, without an error, and is back on its own disk.
      const heartbeats = await guest.waitForHeartbeats((await guest.heartbeats()).length + 1);
      const last = heartbeats.at(-1)!;
      assert.ok(last.writes > before.writes && last.errors === 0, `the guest kept writing (${before.writes} → ${last.writes} writes, ${last.errors} errors)`);
      t.diagnostic(
        `${mode} ${full ? 'full' : 'incremental'}: VM snapshot ${Math.round(stats.vmSnapshotLifetimeMs)} ms, delta ${stats.deltaBytesAtCommit} B, fleecing ${stats.fleecingLifetimeMs ?? '-'} ms, ` +
          `scratch ${stats.scratchBytes ?? '-'} B, read ${(stats.readBytes / MiB).toFixed(1)} MiB in ${Math.round(stats.durationMs)} ms; the guest wrote ${last.writtenMiB - before.writtenMiB} MiB meanwhile`,
      );
      assert.deepEqual(readdirSync(lab().datastore('btrfs').vmDisksDir).filter((name) => name !== `${domainName}.qcow2`), [], 'no overlay or scratch image left');
      const snapshots = join(lab().datastore('btrfs').mountPoint, '.snapshift-snapshots');
      assert.deepEqual(existsSync(snapshots) ? readdirSync(snapshots) : [], [], 'no storage snapshot left');
      assert.deepEqual(catalog.listVmSnapshotLedger(), [], 'the ledger is clear');
      assert.deepEqual((await virsh.disks(domainName)).map((disk) => disk.path), [diskPath], 'the domain runs on its own disk again');
      assert.equal(await virsh.backupJob(domainName), undefined, 'no backup job left');
      await exec('rm', ['-f', reference, restored]);
    });
  }
});
