import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, openSync, readSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { Catalog } from '../../src/catalog/index.ts';
import { exec } from '../../src/core/exec.ts';
import { NbdClient } from '../../src/datamover/nbd/index.ts';
import { alignRegions, regionBytes, type Region } from '../../src/datamover/extent-map.ts';
import { listDirtyBitmaps } from '../../src/hypervisor/qemu/dirty-bitmaps.ts';
import { QmpClient } from '../../src/hypervisor/qemu/qmp-client.ts';
import { withLab } from '../../src/lab/index.ts';
import { randomBytes } from '../../src/lab/nbd-writer.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { runBackup, type BackupRunInput, type VmOutcome } from '../../src/processing/backup-run.ts';
import { initRepository, openRepository, type Repository } from '../../src/repository/index.ts';
import { restoreDisk } from '../../src/restore/disk-restore.ts';
import { makeWorkspace, md5File, md5OfImage } from '../support/workspace.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const password = 'incremental-test';

/** One VM stand-in (qemu-storage-daemon) with a qcow2 and a raw disk, and what the test wrote to it. */
interface TestVm {
  name: string;
  daemon: StorageDaemon;
  dir: string;
  images: Array<{ disk: string; path: string; format: 'qcow2' | 'raw' }>;
  /** Writes since the last backup's VM snapshot, per disk: what the next incremental must read. */
  written: Map<string, Region[]>;
}

describe('incremental backups from QEMU dirty bitmaps, guest-less', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let catalog: Catalog;
  let repository: Repository;
  const vms: TestVm[] = [];
  let seed = 1;

  before(async () => {
    workspace = await makeWorkspace('incr');
    mkdirSync(join(workspace.dir, 'home'));
    catalog = Catalog.open(join(workspace.dir, 'home'));
    await initRepository(join(workspace.dir, 'repo'), { password, encryption: true });
    repository = await openRepository(join(workspace.dir, 'repo'), { password });
  });

  after(async () => {
    for (const vm of vms) await vm.daemon.stop();
    await repository?.close();
    catalog?.close();
    await workspace?.cleanup();
  });
  // Registered after our own `after`, so the daemons holding files on the datastores are gone before it runs.
  const lab = withLab();

  async function startDaemon(vm: Pick<TestVm, 'dir' | 'images'>): Promise<StorageDaemon> {
    return StorageDaemon.start({ dir: vm.dir, images: vm.images.map((image) => ({ path: image.path, format: image.format, nodeName: image.disk })) });
  }

  async function makeVm(name: string, folder = join(workspace.dir, 'disks')): Promise<TestVm> {
    mkdirSync(folder, { recursive: true });
    const dir = join(workspace.dir, 'vms', name);
    mkdirSync(dir, { recursive: true });
    const images: TestVm['images'] = [
      { disk: 'disk0', path: join(folder, `${name}.qcow2`), format: 'qcow2' },
      { disk: 'disk1', path: join(folder, `${name}-data.raw`), format: 'raw' },
    ];
    // Not a multiple of the 1 MiB chunk: the last chunk is short.
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', images[0]!.path, String(40 * MiB + 256 * KiB)]);
    await exec('qemu-img', ['create', '-q', '-f', 'raw', images[1]!.path, String(16 * MiB)]);
    const vm: TestVm = { name, dir, images, daemon: await startDaemon({ dir, images }), written: new Map() };
    vms.push(vm);
    catalog.addHost({ name, kind: 'qemu', qmpSocketPath: vm.daemon.qmpSocketPath, nbdSocketPath: vm.daemon.nbdSocketPath });
    await write(vm, 'disk0', 0, 6 * MiB);
    await write(vm, 'disk0', 40 * MiB, 256 * KiB);
    await write(vm, 'disk1', 2 * MiB, 3 * MiB);
    return vm;
  }

  /** The guest writes pseudo-random bytes; the range is remembered for the next incremental's bound. */
  async function write(vm: TestVm, disk: string, offset: number, length: number, data?: Buffer): Promise<void> {
    await using nbd = await NbdClient.connect({ socketPath: vm.daemon.nbdSocketPath, exportName: disk });
    await nbd.write(offset, data ?? randomBytes(seed++, offset, length));
    await nbd.flush();
    const regions = vm.written.get(disk) ?? [];
    regions.push({ offset, length: data?.length ?? length });
    vm.written.set(disk, regions);
  }


  /**
   * Backs the VM up and returns the outcome with the md5 of each disk at the VM snapshot's instant (the
   * frozen base), and the chunk-rounded bytes the test wrote since the previous snapshot (per disk).
   */
  async function backup(vm: TestVm, extra: Partial<BackupRunInput> = {}, duringBackup?: () => Promise<void>) {
    const reference = new Map<string, string>();
    let expectedChanged = new Map<string, number>();
    const run = await runBackup({
      vms: [catalog.getVm(vm.name)!],
      mode: 'regular',
      repository,
      catalog,
      runDir: join(workspace.dir, 'run'),
      ...extra,
      hooks: {
        afterVmSnapshots: async () => {
          for (const image of vm.images) reference.set(image.disk, await md5OfImage(image.path, image.format, workspace.dir));
          expectedChanged = new Map(
            [...vm.written].map(([disk, regions]) => {
              const sorted = [...regions].sort((a, b) => a.offset - b.offset);
              return [disk, regionBytes(alignRegions(sorted, repository.chunkSizeBytes, Infinity))];
            }),
          );
          vm.written.clear();
          await duringBackup?.();
          await extra.hooks?.afterVmSnapshots?.();
        },
        afterStorageSnapshot: extra.hooks?.afterStorageSnapshot,
      },
    });
    const outcome = run.outcomes[0]!;
    assert.equal(outcome.error, undefined, outcome.error?.message);
    return { outcome, reference, expectedChanged };
  }

  async function assertRestoresTo(outcome: VmOutcome, reference: Map<string, string>): Promise<void> {
    const restorePoint = outcome.result!.restorePoint;
    for (const [disk, expected] of reference) {
      const target = join(workspace.dir, `restore-${restorePoint.id}-${disk}.raw`);
      await restoreDisk(await repository.openRestorePoint(restorePoint.id), disk, target, { format: 'raw', force: true, chunkSizeBytes: repository.chunkSizeBytes });
      assert.equal(await md5File(target), expected, `${disk} of restore point ${restorePoint.id.slice(0, 8)} equals its point in time`);
      await exec('rm', ['-f', target]);
    }
  }

  function diskStats(outcome: VmOutcome, disk: string) {
    return outcome.result!.stats.disks.find((entry) => entry.name === disk)!;
  }

  async function bitmapsOf(vm: TestVm, disk: string) {
    await using qmp = await QmpClient.connect(vm.daemon.qmpSocketPath);
    return await listDirtyBitmaps(qmp, disk); // awaited before the connection is disposed
  }

  test('full, then 3 incrementals with writes between and during backups: each restores to its point in time, reading only what changed', async () => {
    const vm = await makeVm('chain');
    const full = await backup(vm);
    await assertRestoresTo(full.outcome, full.reference);
    for (const disk of ['disk0', 'disk1']) {
      assert.equal(diskStats(full.outcome, disk).cbtSource, 'none');
      assert.equal(diskStats(full.outcome, disk).fallbackReason, null, 'the first backup is full without a reason');
    }
    assert.deepEqual((await bitmapsOf(vm, 'disk0')).map((bitmap) => [bitmap.name.startsWith('snapshift-'), bitmap.recording, bitmap.persistent]), [[true, true, true]]);
    assert.deepEqual((await bitmapsOf(vm, 'disk1')).map((bitmap) => [bitmap.recording, bitmap.persistent]), [[true, false]], 'a raw disk gets an in-memory bitmap');

    for (let round = 1; round <= 3; round++) {
      // Between backups: a few scattered writes, one straddling a chunk boundary.
      await write(vm, 'disk0', round * 3 * MiB + 512 * KiB, MiB);
      await write(vm, 'disk0', (10 + round * 4) * MiB, 64 * KiB);
      await write(vm, 'disk1', round * MiB, 128 * KiB);
      const incremental = await backup(vm, {}, async () => {
        // While the VM snapshot lives (overlay active): these land in the next restore point, not this one.
        await write(vm, 'disk0', 30 * MiB + round * 64 * KiB, 64 * KiB);
        await write(vm, 'disk1', 15 * MiB, 64 * KiB);
      });
      await assertRestoresTo(incremental.outcome, incremental.reference);
      for (const disk of ['disk0', 'disk1']) {
        const stats = diskStats(incremental.outcome, disk);
        const changed = incremental.expectedChanged.get(disk)!;
        assert.equal(stats.cbtSource, 'bitmap', `${disk} round ${round}: ${stats.fallbackReason}`);
        assert.equal(stats.fallbackReason, null);
        assert.ok(stats.dirtyBytes !== null && stats.dirtyBytes > 0);
        assert.ok(stats.readBytes >= changed, `${disk} round ${round}: read ${stats.readBytes} ≥ changed ${changed}`);
        assert.ok(stats.readBytes <= 1.1 * changed, `${disk} round ${round}: read ${stats.readBytes} ≤ 1.1 × changed ${changed}`);
      }
      const names = (await bitmapsOf(vm, 'disk0')).map((bitmap) => bitmap.name);
      assert.equal(names.length, 1, `only the newest bitmap is left: ${names.join(', ')}`);
    }
    assert.equal(catalog.listRestorePoints('chain').length, 4);
    // Live, a rotated persistent bitmap's clusters may look leaked to qemu-img -U (exit 3), never corrupt;
    // after a clean stop the image checks clean.
    await exec('qemu-img', ['check', '-U', '-q', vm.images[0]!.path]).catch((error: Error) => {
      if ((error.cause as { code?: number } | undefined)?.code !== 3) throw error;
    });
    await vm.daemon.stop();
    await exec('qemu-img', ['check', '-q', vm.images[0]!.path]);
  });

  test('a failed backup folds its bitmap back: the next one is still incremental and misses nothing', async () => {
    const vm = await makeVm('failing');
    await backup(vm);
    await write(vm, 'disk0', 5 * MiB, 128 * KiB);
    const controller = new AbortController();
    const run = await runBackup({
      vms: [catalog.getVm(vm.name)!],
      mode: 'regular',
      repository,
      catalog,
      runDir: join(workspace.dir, 'run'),
      signal: controller.signal,
      hooks: {
        afterVmSnapshots: async () => {
          await write(vm, 'disk0', 20 * MiB, 64 * KiB);
          controller.abort(new Error('stopped by the test'));
        },
      },
    });
    assert.match(run.outcomes[0]!.error?.message ?? '', /stopped by the test/);
    const bitmaps = await bitmapsOf(vm, 'disk0');
    assert.equal(bitmaps.length, 1, 'the failed session\'s bitmap is gone');
    assert.ok(bitmaps[0]!.recording, 'the previous bitmap records again');
    await write(vm, 'disk1', 9 * MiB, 64 * KiB);
    const next = await backup(vm);
    assert.equal(diskStats(next.outcome, 'disk0').cbtSource, 'bitmap');
    assert.ok(diskStats(next.outcome, 'disk0').readBytes >= 2 * MiB, 'both writes (before and during the failed backup) are read');
    await assertRestoresTo(next.outcome, next.reference);
  });

  test('fallbacks: QEMU killed (inconsistent bitmap), bitmap removed by hand, disk grown, --full: full read with the reason, correct restore points', async () => {
    const vm = await makeVm('faults');
    await backup(vm);

    // 1. QEMU SIGKILLed and restarted: the qcow2's bitmap is inconsistent, the raw disk's is gone.
    await write(vm, 'disk0', 7 * MiB, 64 * KiB);
    await vm.daemon.kill();
    vm.daemon = await startDaemon(vm);
    assert.ok((await bitmapsOf(vm, 'disk0')).every((bitmap) => bitmap.inconsistent));
    const afterKill = await backup(vm);
    assert.match(diskStats(afterKill.outcome, 'disk0').fallbackReason ?? '', /inconsistent/);
    assert.match(diskStats(afterKill.outcome, 'disk1').fallbackReason ?? '', /is gone/);
    assert.equal(diskStats(afterKill.outcome, 'disk0').cbtSource, 'none');
    await assertRestoresTo(afterKill.outcome, afterKill.reference);
    assert.equal((await bitmapsOf(vm, 'disk0')).filter((bitmap) => bitmap.inconsistent).length, 0, 'the inconsistent bitmap was removed');

    // The chain goes on incrementally from there.
    await write(vm, 'disk0', 8 * MiB, 64 * KiB);
    const resumed = await backup(vm);
    assert.equal(diskStats(resumed.outcome, 'disk0').cbtSource, 'bitmap');
    await assertRestoresTo(resumed.outcome, resumed.reference);

    // 2. Bitmap removed by hand.
    await write(vm, 'disk0', 9 * MiB, 64 * KiB);
    {
      await using qmp = await QmpClient.connect(vm.daemon.qmpSocketPath);
      for (const bitmap of await listDirtyBitmaps(qmp, 'disk0')) await qmp.execute('block-dirty-bitmap-remove', { node: 'disk0', name: bitmap.name });
    }
    const removed = await backup(vm);
    assert.match(diskStats(removed.outcome, 'disk0').fallbackReason ?? '', /is gone/);
    assert.equal(diskStats(removed.outcome, 'disk1').cbtSource, 'bitmap', 'the other disk stays incremental');
    await assertRestoresTo(removed.outcome, removed.reference);

    // 3. Disk grown, live (as block_resize on a VM). The daemon's writable export forbids a resize under it:
    // take it away for the moment, as a guest device would be detached.
    {
      await using qmp = await QmpClient.connect(vm.daemon.qmpSocketPath);
      const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', (event) => event.data?.id === 'disk0-export', { timeoutMs: 10_000 });
      await qmp.execute('block-export-del', { id: 'disk0-export' });
      await deleted;
      await qmp.execute('block_resize', { 'node-name': 'disk0', size: 48 * MiB });
      await qmp.execute('block-export-add', { type: 'nbd', id: 'disk0-export', 'node-name': 'disk0', name: 'disk0', writable: true });
      assert.equal((await listDirtyBitmaps(qmp, 'disk0')).length, 1, 'the bitmap survived the resize');
    }
    await write(vm, 'disk0', 46 * MiB, MiB);
    const grown = await backup(vm);
    assert.match(diskStats(grown.outcome, 'disk0').fallbackReason ?? '', /resized from 42205184 to 50331648 bytes/);
    assert.equal(diskStats(grown.outcome, 'disk0').sizeBytes, 48 * MiB);
    await assertRestoresTo(grown.outcome, grown.reference);

    // 4. --full.
    const forced = await backup(vm, { full: true });
    assert.match(diskStats(forced.outcome, 'disk0').fallbackReason ?? '', /--full/);
    assert.ok(diskStats(forced.outcome, 'disk0').readBytes > 8 * MiB);
    await assertRestoresTo(forced.outcome, forced.reference);
    const after = await backup(vm);
    assert.equal(diskStats(after.outcome, 'disk0').cbtSource, 'bitmap', 'after --full, the new bitmap carries on');
    assert.equal(diskStats(after.outcome, 'disk0').readBytes, 0);
    await assertRestoresTo(after.outcome, after.reference);
  });

  /** Reads `length` bytes at `offset` of a restored raw file. */
  function bytesAt(path: string, offset: number, length: number): Buffer {
    const fd = openSync(path, 'r');
    try {
      const buffer = Buffer.alloc(length);
      readSync(fd, buffer, 0, length, offset);
      return buffer;
    } finally {
      closeSync(fd);
    }
  }

  for (const mode of ['regular', 'storage-snapshot'] as const) {
    test(`${mode}: writes just before the VM snapshot are in this restore point; writes while the overlay lives, right after the commit and during the read are in the next`, async () => {
      const vm = await makeVm(`moments-${mode}`, mode === 'regular' ? undefined : lab().datastore('btrfs').vmDisksDir);
      const run = (extra: Partial<BackupRunInput> = {}, duringBackup?: () => Promise<void>) => backup(vm, { mode, ...extra }, duringBackup);
      await run();
      const pattern = (byte: number) => Buffer.alloc(64 * KiB, byte);
      const at = { before: 11 * MiB, overlay: 12 * MiB + 64 * KiB, afterCommit: 13 * MiB + 128 * KiB, duringRead: 14 * MiB + 192 * KiB };

      await write(vm, 'disk0', at.before, 0, pattern(0xb1));
      let duringRead: Promise<void> | undefined;
      const first = await run(
        {
          hooks: { afterStorageSnapshot: () => write(vm, 'disk0', at.afterCommit, 0, pattern(0xc3)) },
          onProgress: (progress) => {
            if (progress.phase === 'copy') duringRead ??= write(vm, 'disk0', at.duringRead, 0, pattern(0xd4));
          },
        },
        () => write(vm, 'disk0', at.overlay, 0, pattern(0xa2)),
      );
      await duringRead;
      assert.ok(duringRead, 'the guest wrote during the read');
      if (mode === 'regular') await write(vm, 'disk0', at.afterCommit, 0, pattern(0xc3)); // no storage snapshot: right after the backup
      assert.equal(first.outcome.result!.stats.mode, mode);
      assert.equal(diskStats(first.outcome, 'disk0').cbtSource, 'bitmap');
      await assertRestoresTo(first.outcome, first.reference);
      const second = await run();
      assert.equal(diskStats(second.outcome, 'disk0').cbtSource, 'bitmap');
      await assertRestoresTo(second.outcome, second.reference);

      const restored = async (outcome: VmOutcome) => {
        const target = join(workspace.dir, `moments-${outcome.result!.restorePoint.id}.raw`);
        await restoreDisk(await repository.openRestorePoint(outcome.result!.restorePoint.id), 'disk0', target, { format: 'raw', force: true, chunkSizeBytes: repository.chunkSizeBytes });
        return (offset: number) => bytesAt(target, offset, 64 * KiB);
      };
      const inFirst = await restored(first.outcome);
      assert.deepEqual(inFirst(at.before), pattern(0xb1), 'written just before the snapshot: in this restore point');
      for (const offset of [at.overlay, at.afterCommit, at.duringRead]) assert.deepEqual(inFirst(offset), pattern(0), 'written after the snapshot: not in this restore point');
      const inSecond = await restored(second.outcome);
      assert.deepEqual(inSecond(at.before), pattern(0xb1));
      assert.deepEqual(inSecond(at.overlay), pattern(0xa2), 'written while the overlay lived: in the next restore point');
      assert.deepEqual(inSecond(at.afterCommit), pattern(0xc3), 'written right after the commit: in the next restore point');
      assert.deepEqual(inSecond(at.duringRead), pattern(0xd4), 'written during the read: in the next restore point');
      assert.ok(diskStats(second.outcome, 'disk0').readBytes <= 3 * MiB, `the next incremental read ${diskStats(second.outcome, 'disk0').readBytes} bytes for three 64 KiB writes`);
    });
  }
});
