import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { alignRegions, regionBytes, type Region } from '../../src/datamover/extent-map.ts';
import { listDirtyBitmaps } from '../../src/hypervisor/qemu/dirty-bitmaps.ts';
import { QmpClient } from '../../src/hypervisor/qemu/qmp-client.ts';
import type { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { runBackup, type VmOutcome } from '../../src/processing/backup-run.ts';
import { cbtRecordOf } from '../../src/hypervisor/qemu/qemu-cbt.ts';
import { initRepository, openRepository, type Repository } from '../../src/repository/index.ts';
import type { RestorePointSummary } from '../../src/repository/manifest.ts';
import { restoreDisk } from '../../src/restore/disk-restore.ts';
import { closeBackupBed, openBackupBed, startVmStandIn, type BackupBed } from '../support/backup-bed.ts';
import { guestWrite } from '../support/guest-io.ts';
import { md5File, md5OfImage } from '../support/workspace.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const password = 'cbt-two-repositories';

/** One repository the VM is backed up into, and the guest writes since its last backup's VM snapshot. */
interface Target {
  label: string;
  repository: Repository;
  pending: Region[];
}

describe('changed-block tracking with two repositories for one VM (local + offsite)', () => {
  let bed: BackupBed;
  let offsite: Repository;
  const daemons: StorageDaemon[] = [];
  const targets: Target[] = [];

  before(async () => {
    bed = await openBackupBed('cbt2', password);
    await initRepository(join(bed.workspace.dir, 'repo-b'), { password, encryption: true });
    offsite = await openRepository(join(bed.workspace.dir, 'repo-b'), { password });
  });

  after(async () => {
    await offsite?.close();
    await closeBackupBed(bed ?? {}, { daemons });
  });

  async function makeVm(name: string): Promise<{ daemon: StorageDaemon; imagePath: string }> {
    const folder = join(bed.workspace.dir, 'disks');
    mkdirSync(folder, { recursive: true });
    const vm = await startVmStandIn(bed, name, folder, 32 * MiB);
    daemons.push(vm.daemon);
    targets.length = 0; // each test backs its own VM up
    return vm;
  }

  function target(label: string, repository: Repository): Target {
    const made: Target = { label, repository, pending: [] };
    targets.push(made);
    return made;
  }

  /** The guest writes random bytes; every repository's next incremental must read them. */
  async function write(daemon: StorageDaemon, offset: number, length: number): Promise<void> {
    await guestWrite(daemon, offset, randomBytes(length));
    for (const each of targets) each.pending.push({ offset, length });
  }

  /**
   * Backs the VM up into `into` (regular mode) and returns the outcome, the md5 of the disk at the VM
   * snapshot's instant, and the chunk-rounded bytes written since this repository's previous backup.
   */
  async function backup(vmName: string, imagePath: string, into: Target, repository: Repository = into.repository) {
    let reference = '';
    let expectedChangedBytes = 0;
    const run = await runBackup({
      vms: [bed.catalog.getVm(vmName)!],
      mode: 'regular',
      repository,
      catalog: bed.catalog,
      runDir: join(bed.workspace.dir, 'run'),
      hooks: {
        afterVmSnapshots: async () => {
          reference = await md5OfImage(imagePath, 'qcow2', bed.workspace.dir);
          const sorted = [...into.pending].sort((a, b) => a.offset - b.offset);
          expectedChangedBytes = regionBytes(alignRegions(sorted, into.repository.chunkSizeBytes, Infinity));
          into.pending = [];
        },
      },
    });
    const outcome = run.outcomes[0]!;
    assert.equal(outcome.error, undefined, `backup into ${into.label}: ${outcome.error?.message}`);
    return { outcome, reference, expectedChangedBytes };
  }

  function diskStats(outcome: VmOutcome) {
    return outcome.result!.stats.disks.find((entry) => entry.name === 'disk0')!;
  }

  function assertFull(outcome: VmOutcome, label: string): void {
    assert.equal(diskStats(outcome).cbtSource, 'none', `${label}: the first backup into a repository is full`);
    assert.equal(diskStats(outcome).fallbackReason, null, `${label}: a first backup needs no reason`);
  }

  function assertIncremental(backupResult: Awaited<ReturnType<typeof backup>>, label: string): void {
    const stats = diskStats(backupResult.outcome);
    const changed = backupResult.expectedChangedBytes;
    assert.equal(stats.cbtSource, 'bitmap', `${label} must be incremental from its bitmap; fell back: ${stats.fallbackReason}`);
    assert.equal(stats.fallbackReason, null);
    assert.ok(changed > 0);
    assert.ok(stats.readBytes >= changed, `${label}: read ${stats.readBytes} ≥ changed ${changed}`);
    assert.ok(stats.readBytes <= 1.1 * changed, `${label}: read ${stats.readBytes} ≤ 1.1 × changed ${changed}`);
  }

  async function assertRestoresTo(repository: Repository, outcome: VmOutcome, reference: string, label: string): Promise<void> {
    const restorePoint = outcome.result!.restorePoint;
    const restored = join(bed.workspace.dir, `restore-${restorePoint.id}.raw`);
    await restoreDisk(await repository.openRestorePoint(restorePoint.id), 'disk0', restored, { format: 'raw', force: true, chunkSizeBytes: repository.chunkSizeBytes });
    assert.equal(await md5File(restored), reference, `${label} restores bit-exact to its point in time`);
    await rm(restored, { force: true });
  }

  async function bitmapsOf(daemon: StorageDaemon) {
    await using qmp = await QmpClient.connect(daemon.qmpSocketPath);
    return await listDirtyBitmaps(qmp, 'disk0'); // awaited before the connection is disposed
  }

  /** The bitmap the latest restore point of `vmName` in `repository` names for disk0. */
  async function recordedBitmap(repository: Repository, vmName: string): Promise<string> {
    const latest = (await repository.listRestorePoints(vmName)).at(-1);
    const bitmap = latest ? cbtRecordOf(latest)?.disks['disk0']?.bitmap : undefined;
    assert.ok(bitmap, `a restore point of ${vmName} names a bitmap`);
    return bitmap;
  }

  /** Each repository's chain has its own bitmap on the disk, recording; nothing else of ours is there. */
  async function assertOneBitmapPerRepository(daemon: StorageDaemon, vmName: string, repositories: readonly Repository[]): Promise<void> {
    const bitmaps = (await bitmapsOf(daemon)).filter((bitmap) => bitmap.name.startsWith('snapshift-'));
    const expected = await Promise.all(repositories.map((repository) => recordedBitmap(repository, vmName)));
    assert.equal(new Set(expected).size, repositories.length, `each repository names its own bitmap: ${expected.join(', ')}`);
    assert.deepEqual(bitmaps.map((bitmap) => bitmap.name).sort(), [...expected].sort(), 'exactly the bitmaps the repositories\' latest restore points name');
    assert.ok(bitmaps.every((bitmap) => bitmap.recording && !bitmap.inconsistent), 'all record');
  }

  test('full A, full B, write, incremental A, write, incremental B, write, incremental A: each incremental from its own bitmap, each restore bit-exact', async () => {
    const { daemon, imagePath } = await makeVm('two-repos');
    const local = target('A (local)', bed.repository);
    const remote = target('B (offsite)', offsite);

    const fullA = await backup('two-repos', imagePath, local);
    assertFull(fullA.outcome, 'full A');
    const fullB = await backup('two-repos', imagePath, remote);
    assertFull(fullB.outcome, 'full B');
    await assertOneBitmapPerRepository(daemon, 'two-repos', [bed.repository, offsite]);

    // Before A's incremental: one write straddling a chunk boundary, one small one.
    await write(daemon, 5 * MiB + 512 * KiB, MiB);
    await write(daemon, 17 * MiB, 64 * KiB);
    const incrementalA = await backup('two-repos', imagePath, local);
    assertIncremental(incrementalA, 'incremental A');
    assert.equal(incrementalA.expectedChangedBytes, 3 * MiB);
    await assertOneBitmapPerRepository(daemon, 'two-repos', [bed.repository, offsite]);

    // Before B's incremental: B must read these and the writes made before A's incremental too.
    await write(daemon, 9 * MiB, 128 * KiB);
    await write(daemon, 17 * MiB + 512 * KiB, 64 * KiB);
    const incrementalB = await backup('two-repos', imagePath, remote);
    assertIncremental(incrementalB, 'incremental B');
    assert.equal(incrementalB.expectedChangedBytes, 4 * MiB, 'chunks 5, 6, 9 and 17: the writes before both incrementals');
    await assertOneBitmapPerRepository(daemon, 'two-repos', [bed.repository, offsite]);

    // And A again, after B's incremental rotated B's bitmap: A's chain is intact.
    await write(daemon, 25 * MiB, 64 * KiB);
    const incrementalA2 = await backup('two-repos', imagePath, local);
    assertIncremental(incrementalA2, 'second incremental A');
    assert.equal(incrementalA2.expectedChangedBytes, 3 * MiB, 'chunks 9, 17 and 25');
    await assertOneBitmapPerRepository(daemon, 'two-repos', [bed.repository, offsite]);

    await assertRestoresTo(bed.repository, fullA.outcome, fullA.reference, 'full A');
    await assertRestoresTo(offsite, fullB.outcome, fullB.reference, 'full B');
    await assertRestoresTo(bed.repository, incrementalA.outcome, incrementalA.reference, 'incremental A');
    await assertRestoresTo(offsite, incrementalB.outcome, incrementalB.reference, 'incremental B');
    await assertRestoresTo(bed.repository, incrementalA2.outcome, incrementalA2.reference, 'second incremental A');
    assert.notEqual(incrementalA.reference, incrementalB.reference);
  });

  test('bitmaps named as by earlier versions (snapshift-<tag>): adopted by the repository whose latest restore point names it, otherwise removed once', async () => {
    const { daemon, imagePath } = await makeVm('legacy');
    const local = target('A (local)', bed.repository);
    const remote = target('B (offsite)', offsite);
    await backup('legacy', imagePath, remote);
    const fullA = await backup('legacy', imagePath, local);
    assertFull(fullA.outcome, 'full A');

    // What an earlier version would have left: A's latest restore point names `snapshift-<tag>`, a bitmap
    // with exactly the writes since that restore point. Made here by copying A's bitmap under the old name in
    // one transaction (no write between) and showing A's restore points with the old name.
    const current = await recordedBitmap(bed.repository, 'legacy');
    const legacyName = 'snapshift-01d7a9e1';
    const strayLegacyName = 'snapshift-5a5a5a5a';
    {
      await using qmp = await QmpClient.connect(daemon.qmpSocketPath);
      await qmp.execute('transaction', {
        actions: [
          { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: legacyName, persistent: true } },
          { type: 'block-dirty-bitmap-merge', data: { node: 'disk0', target: legacyName, bitmaps: [current] } },
          { type: 'block-dirty-bitmap-remove', data: { node: 'disk0', name: current } },
          // One an interrupted old task left, and one that is not ours at all.
          { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: strayLegacyName, persistent: true } },
          { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'user-bitmap', persistent: true } },
        ],
      });
    }
    const asWrittenByEarlierVersion = withRenamedBitmap(bed.repository, current, legacyName);

    await write(daemon, 3 * MiB, 64 * KiB);
    const adopted = await backup('legacy', imagePath, local, asWrittenByEarlierVersion);
    assertIncremental(adopted, 'incremental A from the adopted bitmap');
    await assertRestoresTo(bed.repository, adopted.outcome, adopted.reference, 'incremental A from the adopted bitmap');
    const names = (await bitmapsOf(daemon)).map((bitmap) => bitmap.name).sort();
    assert.deepEqual(names, [await recordedBitmap(bed.repository, 'legacy'), await recordedBitmap(offsite, 'legacy'), 'user-bitmap'].sort(), 'old names gone, both repositories\' bitmaps and the user\'s stay');

    // B's chain was never touched by any of it.
    const incrementalB = await backup('legacy', imagePath, remote);
    assertIncremental(incrementalB, 'incremental B');
    await assertRestoresTo(offsite, incrementalB.outcome, incrementalB.reference, 'incremental B');
  });

  test('a restore point naming another repository\'s bitmap, or a bitmap in use: a full read with the reason, and the bitmap is left alone', async () => {
    const { daemon, imagePath } = await makeVm('guards');
    const local = target('A (local)', bed.repository);
    const remote = target('B (offsite)', offsite);
    await backup('guards', imagePath, local);
    await backup('guards', imagePath, remote);

    // A's latest restore point, as if copied from B: it names B's bitmap, which A must neither use nor rotate.
    const bitmapA = await recordedBitmap(bed.repository, 'guards');
    const bitmapB = await recordedBitmap(offsite, 'guards');
    await write(daemon, 3 * MiB, 64 * KiB);
    const copied = await backup('guards', imagePath, local, withRenamedBitmap(bed.repository, bitmapA, bitmapB));
    assert.match(diskStats(copied.outcome).fallbackReason ?? '', /belongs to another repository's chain/);
    await assertRestoresTo(bed.repository, copied.outcome, copied.reference, 'A read in full');
    await assertOneBitmapPerRepository(daemon, 'guards', [bed.repository, offsite]);

    // A's bitmap exported by someone else (busy): QEMU would refuse to remove it; the backup reads in full and goes on.
    const busyBitmap = await recordedBitmap(bed.repository, 'guards');
    {
      await using qmp = await QmpClient.connect(daemon.qmpSocketPath);
      await qmp.execute('block-export-add', { type: 'nbd', id: 'busy-export', 'node-name': 'disk0', name: 'busy', writable: true, bitmaps: [busyBitmap] });
      assert.ok((await listDirtyBitmaps(qmp, 'disk0')).find((bitmap) => bitmap.name === busyBitmap)?.busy, 'exporting a bitmap makes it busy');
    }
    await write(daemon, 4 * MiB, 64 * KiB);
    const whileBusy = await backup('guards', imagePath, local);
    assert.match(diskStats(whileBusy.outcome).fallbackReason ?? '', /is in use by another job/);
    await assertRestoresTo(bed.repository, whileBusy.outcome, whileBusy.reference, 'A read in full while its bitmap was busy');
    assert.ok((await bitmapsOf(daemon)).some((bitmap) => bitmap.name === busyBitmap), 'the busy bitmap is left in place');
    {
      await using qmp = await QmpClient.connect(daemon.qmpSocketPath);
      const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', (event) => event.data?.id === 'busy-export', { timeoutMs: 10_000 });
      await qmp.execute('block-export-del', { id: 'busy-export' });
      await deleted;
    }
    await write(daemon, 5 * MiB, 64 * KiB);
    const afterwards = await backup('guards', imagePath, local);
    assertIncremental(afterwards, 'A once the export is gone');
    await assertOneBitmapPerRepository(daemon, 'guards', [bed.repository, offsite]);

    await write(daemon, 6 * MiB, 64 * KiB);
    const incrementalB = await backup('guards', imagePath, remote);
    assertIncremental(incrementalB, 'B after all that');
    assert.equal(incrementalB.expectedChangedBytes, 4 * MiB);
    await assertRestoresTo(offsite, incrementalB.outcome, incrementalB.reference, 'incremental B');
  });
});

/**
 * `repository` as a backup sees it, except that its restore points name `otherName` where they name
 * `bitmap`: what manifests written by an earlier version (bitmaps named `snapshift-<tag>`), or copied from
 * another repository, look like.
 */
function withRenamedBitmap(repository: Repository, bitmap: string, otherName: string): Repository {
  const rename = (summary: RestorePointSummary): RestorePointSummary => {
    const record = cbtRecordOf(summary);
    if (!record) return summary;
    const disks = Object.fromEntries(Object.entries(record.disks).map(([name, disk]) => [name, disk.bitmap === bitmap ? { ...disk, bitmap: otherName } : disk]));
    return { ...summary, extra: { ...summary.extra, cbt: { disks } } };
  };
  return new Proxy(repository, {
    get(target, property) {
      if (property === 'listRestorePoints') return async (vmName?: string) => (await target.listRestorePoints(vmName)).map(rename);
      const value: unknown = Reflect.get(target, property, target);
      return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(target) : value;
    },
  });
}
