// Fleecing (copy-before-write, no delta file, no commit). On a real qemu-storage-daemon while a "guest" writes
// 64 KiB every ~10 ms through NBD: the image read through the export is the guest's disk at the instant of the
// start, on every disk at once (through the Hypervisor interface: openVm(...).startFleecing, quiesced, with CBT
// bitmaps rotated at that instant); the guest never fails a write and loses none; release (and the hunt, after
// a SIGKILL) leaves no job, export, node, scratch file or ledger row. Then on a real TCG guest, which runs no
// NBD server of its own. Prints the measurements the design rests on (start and release time, scratch size
// against what the guest overwrote, write latency).
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, readdir } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { Catalog, type VmTarget } from '../../src/catalog/index.ts';
import { exec } from '../../src/core/exec.ts';
import type { FaultPoint } from '../../src/core/fault-points.ts';
import { NbdClient } from '../../src/datamover/nbd/index.ts';
import { NbdDiskSource } from '../../src/datamover/nbd-disk-source.ts';
import type { CbtPlanInput, FleeceStats, HypervisorVm, VmDisk } from '../../src/hypervisor/hypervisor.ts';
import { openVm } from '../../src/hypervisor/registry.ts';
import { blockNodeNames } from '../../src/hypervisor/qemu/block-graph.ts';
import { listDirtyBitmaps } from '../../src/hypervisor/qemu/dirty-bitmaps.ts';
import { removeFleeceScratchFiles, removeLeftoverFleecing } from '../../src/hypervisor/qemu/fleecing-hunter.ts';
import { startQemuFleecing, type FleeceScratch, type FleecingLedger } from '../../src/hypervisor/qemu/qemu-fleecing.ts';
import { listQemuDisks } from '../../src/hypervisor/qemu/qemu-vm.ts';
import { QmpClient } from '../../src/hypervisor/qemu/qmp-client.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { withLab, type LabVm } from '../../src/lab/index.ts';
import { vmSnapshotLedger } from '../../src/processing/regular-mode.ts';
import { huntOverlaysOnHosts, huntVmSnapshots } from '../../src/processing/snapshot-hunter.ts';
import { hasCode } from '../support/assertions.ts';
import { SteadyWriter } from '../support/steady-writer.ts';
import { makeWorkspace, md5OfImage } from '../support/workspace.ts';

const MiB = 1024 * 1024;
const blockBytes = 64 * 1024;

/** The catalog's ledger, in memory: rows by id. */
class MemoryLedger implements FleecingLedger {
  readonly rows = new Map<number, FleeceScratch[]>();
  #nextId = 1;
  recordIntent(scratch: FleeceScratch[]): number {
    const id = this.#nextId++;
    this.rows.set(id, scratch);
    return id;
  }
  clear(id: number): void {
    this.rows.delete(id);
  }
}

const newTag = (): string => randomBytes(4).toString('hex');
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Reads a whole export in 1 MiB pieces with `pauseMs` between them, so a read takes as long as a real backup's. */
async function readPaced(socketPath: string, exportName: string, pauseMs: number): Promise<Buffer> {
  await using nbd = await NbdClient.connect({ socketPath, exportName });
  const image = Buffer.alloc(nbd.sizeBytes);
  for (let at = 0; at < image.length; at += MiB) {
    await nbd.readInto(at, image.subarray(at, Math.min(at + MiB, image.length)));
    if (pauseMs > 0) await sleep(pauseMs);
  }
  return image;
}

/**
 * Reads an export as a backup does: block status (`base:allocation`) first, then only the data regions, in
 * 1 MiB pieces with `pauseMs` between them; holes stay zero.
 */
async function readDataRegions(socketPath: string, exportName: string, pauseMs: number): Promise<{ image: Buffer; dataBytes: number }> {
  await using source = await NbdDiskSource.open(socketPath, exportName);
  const image = Buffer.alloc(source.sizeBytes);
  let dataBytes = 0;
  for (const region of await source.dataRegions()) {
    dataBytes += region.length;
    for (let at = region.offset; at < region.offset + region.length; at += MiB) {
      (await source.read(at, Math.min(MiB, region.offset + region.length - at))).copy(image, at);
      if (pauseMs > 0) await sleep(pauseMs);
    }
  }
  return { image, dataBytes };
}

/** Distinct region blocks written by writes first+1 … last. */
function distinctBlocks(writer: SteadyWriter, first: number, last: number): number {
  return Math.min(Math.max(0, last - first), writer.blockCount);
}

/**
 * Of the blocks writes cut+1 … last overwrote, those that held data at the cut (written by one of writes
 * 1 … cut): each costs one 64 KiB copy into the scratch. A block still unallocated at the cut is copied as
 * zeroes, which a qcow2 scratch records in its metadata without a data cluster.
 */
function overwrittenDataBlocks(writer: SteadyWriter, cut: number, last: number): number {
  const dataBlocks = Math.min(cut, writer.blockCount); // blocks 0 … dataBlocks-1 held data at the cut
  const overwritten = new Set<number>();
  for (let n = cut + 1; n <= last && overwritten.size < writer.blockCount; n++) overwritten.add((n - 1) % writer.blockCount);
  return [...overwritten].filter((block) => block < dataBlocks).length;
}

/**
 * The instants a cut allows: write `cut` is in the image, so it was sent before the point in time; write
 * cut+1 is not, so it completed after it. Client clock (performance.now()), an open interval.
 */
function instantsOf(writer: SteadyWriter, cut: number): [number, number] {
  return [cut === 0 ? Number.NEGATIVE_INFINITY : writer.sentAtMs[cut - 1]!, writer.completedAtMs[cut] ?? Number.POSITIVE_INFINITY];
}

/** Undefined when `image` is the guest's disk after write `cut`; else where and how it differs. */
function pointInTimeDifference(writer: SteadyWriter, image: Buffer, cut: number): string | undefined {
  const expected = writer.expectedAt(cut);
  const at = SteadyWriter.firstDifference(image, expected);
  if (at === undefined) return undefined;
  const inRegion = at >= writer.regionOffsetBytes && at < writer.regionOffsetBytes + writer.blockCount * writer.blockBytes;
  if (!inRegion) return `differs at ${at}, outside the written region`;
  const blocks: string[] = [];
  for (let index = 0; index < writer.blockCount && blocks.length < 8; index++) {
    const offset = writer.regionOffsetBytes + index * writer.blockBytes;
    const got = image.readBigUInt64LE(offset);
    const want = expected.readBigUInt64LE(offset);
    if (got !== want || !image.subarray(offset, offset + writer.blockBytes).equals(expected.subarray(offset, offset + writer.blockBytes))) blocks.push(`block ${index}: write ${got}, write ${want} expected`);
  }
  return `differs at ${at}; ${blocks.join('; ')}`;
}

interface FleecingChild {
  pid: number;
  exited: Promise<NodeJS.Signals | null>;
  output: () => string;
}

/**
 * A backup task's fleecing in a child process (test/support/fleece-vm-child.ts): resolves once it has
 * started fleecing, exported disk 0 and let go of QMP, and runs on until killed.
 */
async function startFleecingTask(home: string, vmName: string, sessionId: string, runDir: string): Promise<FleecingChild> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'test/support/fleece-vm-child.ts', home, vmName, sessionId, runDir], { stdio: ['pipe', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
  const exited = new Promise<NodeJS.Signals | null>((resolve) => child.on('exit', (_code, signal) => resolve(signal)));
  const waitFor = async (word: string): Promise<void> => {
    for (const deadline = Date.now() + 30_000; !output.includes(word); await sleep(20)) {
      if (child.exitCode !== null || Date.now() > deadline) throw new Error(`fleecing child: no ${word} (${output.trim()})`);
    }
  };
  await waitFor('EXPORTED');
  child.stdin.write('close\n');
  await waitFor('CLOSED');
  return { pid: child.pid!, exited, output: () => output };
}

/** md5 of a whole export, read in 4 MiB pieces with `pauseMs` between them. */
async function md5OfExport(socketPath: string, exportName: string, pauseMs: number): Promise<string> {
  await using nbd = await NbdClient.connect({ socketPath, exportName });
  const hash = createHash('md5');
  const piece = Buffer.alloc(4 * MiB);
  for (let at = 0; at < nbd.sizeBytes; at += piece.length) {
    const part = piece.subarray(0, Math.min(piece.length, nbd.sizeBytes - at));
    await nbd.readInto(at, part);
    hash.update(part);
    if (pauseMs > 0) await sleep(pauseMs);
  }
  return hash.digest('hex');
}

function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

function fmt(ms: number): string {
  return ms.toFixed(ms < 10 ? 2 : 1);
}

describe('fleecing on qemu-storage-daemon (a backup job\'s copy-before-write filter, no delta, no commit)', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let daemon: StorageDaemon;
  let qmp: QmpClient;
  let writers: SteadyWriter[];
  let disks: VmDisk[];
  let catalog: Catalog;
  let target: VmTarget;
  let runDir: string;
  const diskBytes = [64 * MiB, 32 * MiB];

  const connectWriter = (exportName: string) => () => NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName });

  /** Stops every writer and proves the live disks hold every write the guest made. */
  async function assertGuestLostNothing(): Promise<void> {
    for (const [index, writer] of writers.entries()) {
      const last = await writer.stop();
      assert.deepEqual(writer.errors, [], `the guest never failed a write on disk${index}`);
      const live = await readPaced(daemon.nbdSocketPath, `disk${index}`, 0);
      assert.equal(SteadyWriter.firstDifference(live, writer.expectedAt(last)), undefined, `disk${index} holds every write up to ${last}`);
    }
  }

  /** Nothing of ours left in QEMU or beside the disks. */
  async function assertNothingLeft(): Promise<void> {
    const jobs = await qmp.execute<Array<{ device: string }>>('query-block-jobs');
    assert.deepEqual(jobs, [], 'no job');
    const exports = await qmp.execute<Array<{ id: string }>>('query-block-exports');
    assert.deepEqual(exports.map((entry) => entry.id).sort(), ['disk0-export', 'disk1-export'], 'only the guest\'s exports');
    assert.deepEqual([...(await blockNodeNames(qmp))].filter((name) => name.startsWith('snapshift-')), [], 'no node of ours');
    assert.deepEqual((await readdir(join(workspace.dir, 'disks'))).sort(), ['disk0.qcow2', 'disk1.qcow2'], 'no scratch file');
  }

  before(async () => {
    workspace = await makeWorkspace('fleece');
    await mkdir(join(workspace.dir, 'disks'));
    for (const [index, size] of diskBytes.entries()) await exec('qemu-img', ['create', '-q', '-f', 'qcow2', join(workspace.dir, 'disks', `disk${index}.qcow2`), String(size)]);
    daemon = await StorageDaemon.start({
      dir: workspace.dir,
      images: diskBytes.map((_, index) => ({ path: join(workspace.dir, 'disks', `disk${index}.qcow2`), format: 'qcow2' as const, nodeName: `disk${index}` })),
    });
    writers = [
      // disk0: data at both ends, a 32 MiB region (512 blocks) the guest keeps writing in the middle.
      await SteadyWriter.prepare({ connect: connectWriter('disk0'), sizeBytes: diskBytes[0]!, dataRanges: [[0, 8 * MiB], [56 * MiB, 8 * MiB]], regionOffsetBytes: 16 * MiB, regionBytes: 32 * MiB, intervalMs: 10 }),
      await SteadyWriter.prepare({ connect: connectWriter('disk1'), sizeBytes: diskBytes[1]!, dataRanges: [[0, 2 * MiB]], regionOffsetBytes: 4 * MiB, regionBytes: 16 * MiB, intervalMs: 10 }),
    ];
    await mkdir(join(workspace.dir, 'home'));
    catalog = Catalog.open(join(workspace.dir, 'home'));
    target = catalog.addQemuVm({ name: 'fleecy', qmpSocketPath: daemon.qmpSocketPath, nbdSocketPath: daemon.nbdSocketPath });
    runDir = join(workspace.dir, 'run');
    await mkdir(runDir);
    qmp = await QmpClient.connect(daemon.qmpSocketPath);
    disks = (await listQemuDisks(qmp)).sort((a, b) => a.name.localeCompare(b.name));
    assert.deepEqual(disks.map((disk) => disk.name), ['disk0', 'disk1']);
  });

  after(async () => {
    for (const writer of writers ?? []) await writer.stop();
    await qmp?.close();
    catalog?.close();
    await daemon?.stop();
    await workspace?.cleanup();
  });

  /** Gives QMP to an opened HypervisorVm for `work` (QEMU serves one QMP client at a time), then takes it back. */
  async function throughVm<T>(work: (vm: HypervisorVm) => Promise<T>): Promise<T> {
    await qmp.close();
    try {
      await using vm = await openVm(target);
      return await work(vm);
    } finally {
      qmp = await QmpClient.connect(daemon.qmpSocketPath);
    }
  }

  test('through the Hypervisor interface: two disks read at one instant (quiesced) while the guest writes; nothing lost, nothing left; the measurements', async () => {
    for (const writer of writers) writer.start();
    await sleep(300);
    // Without fleecing: the guest's latency while a backup-like reader reads its live disk at the same pace.
    const baselineFrom = performance.now();
    await readPaced(daemon.nbdSocketPath, 'disk0', 40);
    const baselineTo = performance.now();

    const sessionId = randomUUID();
    const quiesceAt: Record<'freeze' | 'thaw', number[]> = { freeze: [], thaw: [] };
    const quiesce = { freeze: async () => void quiesceAt.freeze.push(performance.now()), thaw: async () => void quiesceAt.thaw.push(performance.now()) };
    const run = await throughVm(async (vm) => {
      const vmDisks = (await vm.listDisks()).sort((a, b) => a.name.localeCompare(b.name));
      const before = writers.map((writer) => writer.completed);
      const startCalledAt = performance.now();
      const fleece = await vm.startFleecing(vmDisks, { tag: sessionId.slice(0, 8), ledger: vmSnapshotLedger(catalog, target, sessionId), runDir, quiesce });
      const startReturnedAt = performance.now();
      const afterStart = writers.map((writer) => writer.completed);
      const [row, ...more] = catalog.listVmSnapshotLedger(target.name);
      assert.equal(more.length, 0, 'one ledger row while fleecing lives');
      assert.equal(row?.adapter?.['fleecing'], true, 'the row says fleecing');
      assert.equal(row.sessionId, sessionId);
      assert.deepEqual(row.overlays.map((overlay) => basename(overlay.overlayPath)), vmDisks.map((_disk, index) => `snapshift-${sessionId.slice(0, 8)}-fleece-${index}.qcow2`), 'its overlays are the scratch images');
      assert.deepEqual((await vm.listDisks()).map((disk) => disk.nodeName).sort(), ['disk0', 'disk1'], 'the disks are still listed under their filters');

      // disk0 read whole; disk1 as a backup reads, through block status.
      const images: Buffer[] = [];
      let disk1DataBytes = 0;
      for (const [index, disk] of vmDisks.entries()) {
        await using diskExport = await fleece.exportDisk(disk, index);
        if (index === 0) {
          images.push(await readPaced(diskExport.socketPath, diskExport.exportName, 40));
        } else {
          const { image, dataBytes } = await readDataRegions(diskExport.socketPath, diskExport.exportName, 40);
          images.push(image);
          disk1DataBytes = dataBytes;
        }
      }
      assert.ok(fleece.verifyIntact, 'QEMU fleecing can lose its point in time: it offers verifyIntact');
      await fleece.verifyIntact();
      const readDoneAt = performance.now();
      const completedBeforeRelease = writers.map((writer) => writer.completed);
      const releaseCalledAt = performance.now();
      const stats = await fleece.release();
      const releaseMs = performance.now() - releaseCalledAt;
      const completedAfterRelease = writers.map((writer) => writer.completed);
      assert.deepEqual(await fleece.release(), stats, 'release is idempotent');
      await fleece[Symbol.asyncDispose]();
      assert.deepEqual(catalog.listVmSnapshotLedger(target.name), [], 'the ledger row is cleared');
      return { images, disk1DataBytes, before, afterStart, startCalledAt, startReturnedAt, readDoneAt, completedBeforeRelease, completedAfterRelease, stats, releaseMs };
    });

    const cuts = writers.map((writer, index) => writer.cutOf(run.images[index]!));
    for (const [index, writer] of writers.entries()) {
      const cut = cuts[index]!;
      assert.equal(pointInTimeDifference(writer, run.images[index]!, cut), undefined, `disk${index} reads as the guest's disk after write ${cut}`);
      assert.equal(sha256(run.images[index]!), sha256(writer.expectedAt(cut)), `disk${index}: hash of what was read = hash of the point in time`);
      assert.ok(cut >= run.before[index]! && cut <= run.afterStart[index]!, `disk${index}: cut ${cut} within [${run.before[index]}, ${run.afterStart[index]}] (the writes around the start)`);
    }
    assert.ok(run.disk1DataBytes >= 2 * MiB && run.disk1DataBytes <= 18 * MiB, `block status skipped disk1's holes (${run.disk1DataBytes} bytes of data read)`);
    // One instant for both disks, inside the quiesced window: the instants each cut allows overlap the freeze…thaw.
    assert.equal(quiesceAt.freeze.length, 1, 'frozen once');
    assert.equal(quiesceAt.thaw.length, 1, 'thawed once');
    const [frozenAt, thawedAt] = [quiesceAt.freeze[0]!, quiesceAt.thaw[0]!];
    assert.ok(run.startCalledAt < frozenAt && frozenAt < thawedAt && thawedAt < run.startReturnedAt, 'freeze, then thaw, inside the start');
    const [low0, high0] = instantsOf(writers[0]!, cuts[0]!);
    const [low1, high1] = instantsOf(writers[1]!, cuts[1]!);
    assert.ok(Math.max(low0, low1, frozenAt) < Math.min(high0, high1, thawedAt), `the cuts allow one common instant while frozen: disk0 (${low0}, ${high0}), disk1 (${low1}, ${high1}), frozen (${frozenAt}, ${thawedAt})`);

    // What the guest overwrote after the cut: each first write to a block that held data costs one 64 KiB copy.
    const copiedAtLeast = writers.reduce((sum, writer, index) => sum + overwrittenDataBlocks(writer, cuts[index]!, run.completedBeforeRelease[index]!), 0) * blockBytes;
    const copiedAtMost = writers.reduce((sum, writer, index) => sum + overwrittenDataBlocks(writer, cuts[index]!, run.completedAfterRelease[index]! + 1), 0) * blockBytes;
    assert.ok(copiedAtLeast > 4 * MiB, `the guest overwrote ${copiedAtLeast} bytes of the point in time's data`);
    assert.ok(run.stats.scratchBytes >= copiedAtLeast && run.stats.scratchBytes <= copiedAtMost + 2 * MiB, `scratch ${run.stats.scratchBytes} bytes for ${copiedAtLeast}–${copiedAtMost} bytes of data overwritten`);

    await assertNothingLeft();
    await assertGuestLostNothing();

    const baseline = writers[0]!.latenciesMs(baselineFrom, baselineTo);
    const during = writers[0]!.latenciesMs(run.startReturnedAt, run.readDoneAt);
    const writtenBytes = writers.reduce((sum, _writer, index) => sum + (run.completedBeforeRelease[index]! - cuts[index]!), 0) * blockBytes;
    console.log(
      [
        `fleecing of 2 disks (${diskBytes.map((size) => size / MiB).join(' + ')} MiB) through the Hypervisor interface:`,
        `  start ${fmt(run.startReturnedAt - run.startCalledAt)} ms (frozen ${fmt(thawedAt - frozenAt)} ms); release ${fmt(run.releaseMs)} ms; lifetime ${fmt(run.stats.lifetimeMs)} ms`,
        `  read of ${diskBytes.reduce((a, b) => a + b) / MiB} MiB took ${fmt(run.readDoneAt - run.startReturnedAt)} ms; the guest wrote ${(writtenBytes / MiB).toFixed(2)} MiB meanwhile, ${(copiedAtLeast / MiB).toFixed(2)} MiB of it over distinct blocks of the point in time's data; scratch at release ${(run.stats.scratchBytes / MiB).toFixed(2)} MiB`,
        `  guest write latency (disk0, 64 KiB), reader on the live disk, no fleecing: p50 ${fmt(SteadyWriter.percentile(baseline, 0.5))} ms, p99 ${fmt(SteadyWriter.percentile(baseline, 0.99))} ms (${baseline.length} writes)`,
        `  guest write latency (disk0, 64 KiB), fleecing, reader on the export:    p50 ${fmt(SteadyWriter.percentile(during, 0.5))} ms, p99 ${fmt(SteadyWriter.percentile(during, 0.99))} ms (${during.length} writes)`,
      ].join('\n'),
    );
  });

  test('through the Hypervisor interface: changed-block tracking rotates its bitmaps at the fleecing instant', async () => {
    const writer = writers[0]!;
    writer.start();
    await sleep(200);
    const chainKey = '0123456789abcdef';
    const disk0Only = (disks: VmDisk[]) => disks.filter((disk) => disk.name === 'disk0');
    /** One backup's worth: plan, fleece (rotations in its transaction), read the image and the changed regions, release, finish. */
    const backup = (latest: CbtPlanInput['latest']) =>
      throughVm(async (vm) => {
        const disks = disk0Only(await vm.listDisks());
        const sessionId = randomUUID();
        const tag = sessionId.slice(0, 8);
        const plan = await vm.planChangedBlocks(disks, { latest, chainKey, tag, runDir });
        await using fleece = await vm.startFleecing(disks, { tag, ledger: vmSnapshotLedger(catalog, target, sessionId), runDir, cbt: plan });
        let changed: Array<{ offset: number; length: number }> | undefined;
        const readPlan = plan.readPlans.get('disk0')!;
        if (readPlan.kind === 'changed') changed = await readPlan.source.changedRegions();
        await using diskExport = await fleece.exportDisk(disks[0]!, 0);
        const image = await readPaced(diskExport.socketPath, diskExport.exportName, 10);
        await fleece.verifyIntact?.();
        await fleece.release();
        assert.deepEqual(await plan.finish(true), [], 'bitmaps cleaned up');
        return { image, changed, record: plan.record };
      });

    const first = await backup(undefined);
    assert.equal(first.changed, undefined, 'the first backup reads in full');
    const cut1 = writer.cutOf(first.image);
    assert.equal(pointInTimeDifference(writer, first.image, cut1), undefined, 'the first point in time');
    await sleep(600);
    const second = await backup({ id: 'first-restore-point', extra: { cbt: first.record } });
    const cut2 = writer.cutOf(second.image);
    assert.equal(pointInTimeDifference(writer, second.image, cut2), undefined, 'the second point in time');
    const expected = new Set<number>();
    for (let n = cut1 + 1; n <= cut2; n++) expected.add(writer.offsetOf(n));
    const marked = new Set<number>();
    for (const region of second.changed ?? []) for (let at = region.offset; at < region.offset + region.length; at += blockBytes) marked.add(at);
    assert.ok(expected.size > 10, `the guest wrote ${expected.size} blocks between the two fleecings`);
    assert.deepEqual([...marked].sort((a, b) => a - b), [...expected].sort((a, b) => a - b), `the first fleecing's bitmap marks exactly writes ${cut1 + 1}…${cut2}: it started at the first cut and froze at the second`);

    const last = await writer.stop();
    const bitmaps = await listDirtyBitmaps(qmp, 'disk0');
    const secondRecord = second.record as { disks: Record<string, { bitmap: string }> };
    const tracking = bitmaps.find((bitmap) => bitmap.name === secondRecord.disks['disk0']!.bitmap);
    assert.deepEqual(bitmaps.map((bitmap) => bitmap.name), [secondRecord.disks['disk0']!.bitmap], 'only the second fleecing\'s bitmap is left');
    assert.ok(tracking?.recording, 'it records');
    assert.equal(tracking.count, distinctBlocks(writer, cut2, last) * blockBytes, `it marks exactly writes ${cut2 + 1}…${last}: it started at the second cut`);
    await qmp.execute('block-dirty-bitmap-remove', { node: 'disk0', name: tracking.name });
    await assertNothingLeft();
    await assertGuestLostNothing();
  });

  test('a refused transaction undoes exactly what was created, and says why', async () => {
    const ledger = new MemoryLedger();
    writers[1]!.start();
    await assert.rejects(
      startQemuFleecing(qmp, disks, { tag: newTag(), ledger, dirtyBitmaps: [{ nodeName: 'disk0', freeze: 'snapshift-0123456789abcdef-00000000', start: { name: 'snapshift-0123456789abcdef-11111111', persistent: true } }] }),
      hasCode('FLEECING_FAILED', /could not start fleecing: .*transaction failed/),
    );
    assert.equal(ledger.rows.size, 0, 'the ledger row is cleared');
    assert.deepEqual(await listDirtyBitmaps(qmp, 'disk0'), [], 'no bitmap added');
    await assertNothingLeft();
    await assertGuestLostNothing();
  });

  test('reads racing the guest\'s first writes to the very blocks they read (one NBD request per MiB) see the point in time', async () => {
    // The NBD server serves a don't-fragment read as one request across copied and uncopied blocks: the case
    // QEMU 7.2's snapshot-access gets wrong (qemu-fleecing.ts); the default read scheme must not.
    const writer = writers[1]!;
    const disk = disks[1]!;
    writer.start();
    await sleep(200);
    await using fleece = await startQemuFleecing(qmp, [disk], { tag: newTag(), ledger: new MemoryLedger(), nbdServerSocketPath: daemon.nbdSocketPath });
    await using diskExport = await fleece.exportDisk(disk, 0, { exportName: 'pit-race', socketPath: join(workspace.dir, 'unused.sock') });
    await using nbd = await NbdClient.connect({ socketPath: diskExport.socketPath, exportName: diskExport.exportName });
    const reads: Array<{ at: number; data: Buffer }> = [];
    for (const until = performance.now() + 3_000; performance.now() < until; ) {
      const next = writer.offsetOf(writer.completed + 1);
      const at = next - (next % MiB);
      reads.push({ at, data: await nbd.read(at, MiB, { dontFragment: true }) });
    }
    const image = await nbd.read(0, disk.virtualSizeBytes);
    await fleece.verifyIntact();
    const cut = writer.cutOf(image);
    assert.equal(pointInTimeDifference(writer, image, cut), undefined);
    const expected = writer.expectedAt(cut);
    const wrong = reads.filter(({ at, data }) => !data.equals(expected.subarray(at, at + MiB)));
    assert.ok(reads.length > 100, `${reads.length} racing reads`);
    assert.equal(wrong.length, 0, `${wrong.length} of ${reads.length} racing reads (scheme ${fleece.readScheme}) held data written after the point in time`);
    await fleece.release();
    await assertNothingLeft();
    await assertGuestLostNothing();
  });

  test('a job cancelled behind our back: verifyIntact says the point in time is lost, and the exports go', async () => {
    const disk = disks[0]!;
    writers[0]!.start();
    await using fleece = await startQemuFleecing(qmp, [disk], { tag: newTag(), ledger: new MemoryLedger(), nbdServerSocketPath: daemon.nbdSocketPath });
    const diskExport = await fleece.exportDisk(disk, 0, { exportName: 'pit-cancelled', socketPath: join(workspace.dir, 'unused.sock') });
    const [job] = await qmp.execute<Array<{ device: string }>>('query-block-jobs');
    const cancelled = qmp.waitForEvent('BLOCK_JOB_CANCELLED', (event) => event.data['device'] === job!.device, { timeoutMs: 10_000 });
    await qmp.execute('block-job-cancel', { device: job!.device, force: true });
    await cancelled;
    await assert.rejects(fleece.verifyIntact(), hasCode('FLEECING_BROKEN', /ended/));
    assert.deepEqual((await qmp.execute<Array<{ id: string }>>('query-block-exports')).filter((entry) => entry.id.includes('fleece')), [], 'no export serves the live disk as if it were the point in time');
    await assert.rejects(readPaced(diskExport.socketPath, diskExport.exportName, 0));
    await fleece.release();
    await assertNothingLeft();
    await assertGuestLostNothing();
  });

  test('the snapshot-access scheme (the default from QEMU 8.0): reads, and the hunter and a release after it remove it all', async () => {
    const disk = disks[1]!;
    const writer = writers[1]!;
    const last = await writer.stop(); // no guest writes: 7.2's snapshot-access misreads only copied runs
    const ledger = new MemoryLedger();
    const tag = newTag();
    const fleece = await startQemuFleecing(qmp, [disk], { tag, ledger, readScheme: 'snapshot-access', nbdServerSocketPath: daemon.nbdSocketPath });
    assert.equal(fleece.readScheme, 'snapshot-access');
    await fleece.exportDisk(disk, 0, { exportName: 'pit-access', socketPath: join(workspace.dir, 'unused.sock') });
    const image = await readPaced(daemon.nbdSocketPath, 'pit-access', 0);
    assert.equal(pointInTimeDifference(writer, image, last), undefined);
    // As if our process had died: the hunter finds export, access node, job and scratch node by name.
    const [hunted] = await removeLeftoverFleecing(qmp, () => false);
    assert.equal(hunted?.tag, tag);
    assert.equal(hunted.exports.length, 1);
    assert.deepEqual(hunted.jobs, [`snapshift-${tag}-fleece-0`]);
    assert.deepEqual(hunted.nodes.sort(), [`snapshift-${tag}-fleece-0`, `snapshift-${tag}-fleece-0-r`]);
    assert.equal(hunted.scratchPaths.length, 1);
    await assert.rejects(fleece.verifyIntact(), hasCode('FLEECING_BROKEN'));
    await fleece.release(); // reads QEMU's state: nothing left to remove, and the ledger row goes
    assert.equal(ledger.rows.size, 0);
    await assertNothingLeft();
  });

  test('the scratch guard gives the point in time up before a full scratch could fail a guest write', { skip: process.getuid?.() !== 0 && 'mounting a small tmpfs needs root' }, async () => {
    const small = join(workspace.dir, 'small');
    await mkdir(small);
    await exec('mount', ['-t', 'tmpfs', '-o', 'size=16M', 'snapshift-test', small]);
    try {
      const writer = writers[0]!;
      writer.start();
      const ledger = new MemoryLedger();
      // 6.4 MB/s of first writes fill 16 MiB in ~2.5 s: the guard must act before the copy-before-write
      // fails with ENOSPC, which QEMU 7.2 would hand to the guest.
      await using fleece = await startQemuFleecing(qmp, [disks[0]!], { tag: newTag(), ledger, scratchFolder: small, scratchGuard: { minFreeBytes: 4 * MiB } });
      const exported = await fleece.exportDisk(disks[0]!, 0, { exportName: 'pit-guard', socketPath: daemon.nbdSocketPath, existingServerSocketPath: daemon.nbdSocketPath });
      const deadline = Date.now() + 15_000;
      while (fleece.brokenReason === undefined && Date.now() < deadline) await sleep(50);
      assert.match(fleece.brokenReason ?? 'not broken', /only \d+ bytes are free in .*small/);
      await sleep(300); // the guest writes on
      assert.deepEqual(writer.errors, [], 'the guest never failed a write');
      await assert.rejects(readPaced(exported.socketPath, exported.exportName, 0), /NBD|ENOTSUP|disconnect/i, 'the point in time fails to read, never reads wrong');
      await assert.rejects(fleece.exportDisk(disks[0]!, 0, { exportName: 'again', socketPath: daemon.nbdSocketPath, existingServerSocketPath: daemon.nbdSocketPath }), hasCode('FLEECING_BROKEN'));
      await assert.rejects(fleece.verifyIntact(), hasCode('FLEECING_BROKEN', /only \d+ bytes are free/));
      const stats = await fleece.release();
      assert.ok(stats.scratchBytes <= 16 * MiB);
      assert.equal(ledger.rows.size, 0);
      assert.deepEqual(await readdir(small), [], 'the scratch file is gone');
      await assertNothingLeft();
      await assertGuestLostNothing();
    } finally {
      // After the fleecing's disposal (await using), which lets go of the scratch file.
      await exec('umount', [small]).catch(async () => {
        await sleep(500);
        await exec('umount', ['--lazy', small]);
      });
    }
  });

  test('a process killed with fleecing active (or at any fleecing fault point): the hunter removes what it left', async () => {
    const cases: Array<{ fault?: FaultPoint; release?: true }> = [
      { fault: 'fleece.after-ledger-intent' },
      { fault: 'fleece.transaction-sent' },
      { fault: 'fleece.after-start' },
      {}, // SIGKILLed by us, with an export open
      { fault: 'fleece.before-release', release: true },
    ];
    for (const writer of writers) writer.start();
    for (const { fault, release } of cases) {
      const what = fault ?? 'SIGKILL after the export';
      const tag = newTag();
      const ledgerFile = join(workspace.dir, `ledger-${tag}.jsonl`);
      await qmp.close(); // one QMP client at a time: the child's turn
      const child = spawn(process.execPath, ['--import', 'tsx', 'test/support/fleece-child.ts', daemon.qmpSocketPath, daemon.nbdSocketPath, tag, ledgerFile, ...(release ? ['release'] : [])], {
        env: { ...process.env, ...(fault ? { SNAPSHIFT_FAULT: fault } : {}) },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let output = '';
      child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
      child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
      const exited = new Promise<NodeJS.Signals | null>((resolve) => child.on('exit', (_code, signal) => resolve(signal)));
      if (!fault) {
        while (!output.includes('EXPORTED') && child.exitCode === null) await sleep(20);
        process.kill(child.pid!, 'SIGKILL');
      }
      assert.equal(await exited, 'SIGKILL', `${what}: the child was killed (${output.trim()})`);
      if (fault) assert.match(output, new RegExp(`killing process \\d+ at ${fault.replace('.', '\\.')}`));
      qmp = await QmpClient.connect(daemon.qmpSocketPath);

      const rows = new Map<number, FleeceScratch[]>();
      for (const line of readFileSync(ledgerFile, 'utf8').trim().split('\n')) {
        const record = JSON.parse(line) as { intent?: number; scratch?: FleeceScratch[]; clear?: number };
        if (record.intent !== undefined) rows.set(record.intent, record.scratch!);
        if (record.clear !== undefined) rows.delete(record.clear);
      }
      assert.equal(rows.size, 1, `${what}: the ledger row was written first and is still there`);
      assert.deepEqual(await removeLeftoverFleecing(qmp, (live) => live === tag), [], `${what}: a live tag's fleecing is left alone`);
      const hunted = await removeLeftoverFleecing(qmp, () => false);
      if (fault === 'fleece.after-ledger-intent') assert.deepEqual(hunted, [], 'nothing reached QEMU');
      else assert.equal(hunted[0]?.tag, tag, `${what}: the hunter found it: ${JSON.stringify(hunted)}`);
      if (fault === undefined) assert.equal(hunted[0]!.exports.length, 1, 'the export is removed');
      const [scratch] = [...rows.values()];
      const removals = await removeFleeceScratchFiles(scratch!);
      assert.ok(removals.every((removal) => removal.action !== 'not-ours'));
      assert.ok(scratch!.every(({ scratchPath }) => !existsSync(scratchPath)), `${what}: no scratch file`);
      await assertNothingLeft();
    }
    await assertGuestLostNothing();
  });

  /** Starts test/support/fleece-vm-child.ts (fleecing of both disks, disk 0 exported) and waits until it let go of QMP. */
  async function startFleecingChild(sessionId: string): Promise<FleecingChild> {
    await qmp.close(); // the child's turn on the monitor
    const child = await startFleecingTask(join(workspace.dir, 'home'), target.name, sessionId, runDir);
    qmp = await QmpClient.connect(daemon.qmpSocketPath);
    return child;
  }

  /** What of fleecing `tag` QEMU and the disks' folder still hold. */
  async function fleecingOf(tag: string): Promise<{ jobs: string[]; nodes: string[]; scratchFiles: string[] }> {
    const jobs = (await qmp.execute<Array<{ device: string }>>('query-block-jobs')).map((job) => job.device).filter((id) => id.includes(tag));
    const nodes = [...(await blockNodeNames(qmp))].filter((name) => name.includes(tag)).sort();
    const scratchFiles = (await readdir(join(workspace.dir, 'disks'))).filter((name) => name.includes(tag)).sort();
    return { jobs, nodes, scratchFiles };
  }

  test('through the Hypervisor interface: a task SIGKILLed with fleecing active; the hunt spares it while its owner runs, then removes scratch images and filters (ledger row, or by name when the row is lost) while the guest writes on', async () => {
    for (const writer of writers) writer.start();
    const withRow = randomUUID();
    const withRowTag = withRow.slice(0, 8);
    const child = await startFleecingChild(withRow);
    const fleecing = await fleecingOf(withRowTag);
    assert.equal(fleecing.jobs.length, 2, 'a job (and its copy-before-write filter) per disk');
    assert.equal(fleecing.scratchFiles.length, 2, 'a scratch image per disk');

    await qmp.close(); // the hunt's turn
    const whileAlive = [...(await huntVmSnapshots(catalog)), ...(await huntOverlaysOnHosts(catalog))];
    assert.deepEqual(whileAlive, [], 'nothing of a running session is touched');
    qmp = await QmpClient.connect(daemon.qmpSocketPath);
    assert.deepEqual(await fleecingOf(withRowTag), fleecing, 'its fleecing is all there');

    process.kill(child.pid, 'SIGKILL');
    assert.equal(await child.exited, 'SIGKILL', child.output());
    const writesAtKill = writers.map((writer) => writer.completed);
    await qmp.close();
    const dryRun = await huntVmSnapshots(catalog, { dryRun: true });
    assert.deepEqual(dryRun.map((action) => action.action), ['removed-fleecing', 'removed-fleecing'], JSON.stringify(dryRun));
    assert.equal(catalog.listVmSnapshotLedger(target.name).length, 1, 'a dry run keeps the row');
    qmp = await QmpClient.connect(daemon.qmpSocketPath);
    assert.deepEqual(await fleecingOf(withRowTag), fleecing, 'and changes nothing in QEMU or on disk');

    await qmp.close();
    const huntStartedAt = performance.now();
    const hunted = await huntVmSnapshots(catalog);
    const huntMs = performance.now() - huntStartedAt;
    assert.deepEqual(hunted.map((action) => [action.action, basename(action.overlayPath)]), fleecing.scratchFiles.map((file) => ['removed-fleecing', file]), JSON.stringify(hunted));
    assert.match(hunted[0]!.detail, new RegExp(`job snapshift-${withRowTag}-fleece-0`));
    assert.deepEqual(catalog.listVmSnapshotLedger(target.name), [], 'the row is cleared');
    assert.deepEqual(await huntOverlaysOnHosts(catalog), [], 'nothing left for the host hunt');
    qmp = await QmpClient.connect(daemon.qmpSocketPath);
    await assertNothingLeft();

    // The row lost (say, a catalog restored from a backup): the host hunt finds the fleecing by its names.
    const lostRow = randomUUID();
    const lostRowTag = lostRow.slice(0, 8);
    const second = await startFleecingChild(lostRow);
    process.kill(second.pid, 'SIGKILL');
    assert.equal(await second.exited, 'SIGKILL', second.output());
    for (const entry of catalog.listVmSnapshotLedger(target.name)) catalog.clearLedgerEntry(entry.id);
    const before = await fleecingOf(lostRowTag);
    await qmp.close();
    const dryHostHunt = await huntOverlaysOnHosts(catalog, { dryRun: true });
    assert.deepEqual(dryHostHunt.map((action) => action.action), ['removed-fleecing'], JSON.stringify(dryHostHunt));
    qmp = await QmpClient.connect(daemon.qmpSocketPath);
    assert.deepEqual(await fleecingOf(lostRowTag), before, 'a dry run changes nothing');
    await qmp.close();
    const hostHunt = await huntOverlaysOnHosts(catalog);
    assert.deepEqual(hostHunt.map((action) => action.action), ['removed-fleecing'], JSON.stringify(hostHunt));
    assert.match(hostHunt[0]!.detail, new RegExp(`fleecing ${lostRowTag} .*job snapshift-${lostRowTag}-fleece-0.*scratch image`));
    qmp = await QmpClient.connect(daemon.qmpSocketPath);
    await assertNothingLeft();

    // The guest never noticed: it wrote on through both kills and both hunts, and lost nothing.
    await writers[0]!.waitForWrites(20);
    assert.ok(writers.every((writer, index) => writer.completed > writesAtKill[index]! + 20), 'the guest kept writing');
    console.log(`hunt of a killed task's fleecing (2 disks) from its ledger row: ${fmt(huntMs)} ms`);
    await assertGuestLostNothing();
  });
});

describe('the hunt of a fleecing whose QEMU is gone', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let daemon: StorageDaemon;
  let catalog: Catalog;

  before(async () => {
    workspace = await makeWorkspace('fleece-gone');
    await mkdir(join(workspace.dir, 'home'));
    await mkdir(join(workspace.dir, 'disks'));
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', join(workspace.dir, 'disks', 'disk0.qcow2'), String(16 * MiB)]);
    daemon = await StorageDaemon.start({ dir: workspace.dir, images: [{ path: join(workspace.dir, 'disks', 'disk0.qcow2'), format: 'qcow2', nodeName: 'disk0' }] });
    catalog = Catalog.open(join(workspace.dir, 'home'));
    catalog.addQemuVm({ name: 'gone', qmpSocketPath: daemon.qmpSocketPath, nbdSocketPath: daemon.nbdSocketPath });
  });

  after(async () => {
    catalog?.close();
    await daemon?.kill();
    await workspace?.cleanup();
  });

  test('a scratch image some process still holds stays with its row; once nobody holds it, it is deleted and the row cleared', async () => {
    const sessionId = randomUUID();
    const child = await startFleecingTask(join(workspace.dir, 'home'), 'gone', sessionId, join(workspace.dir, 'run'));
    process.kill(child.pid, 'SIGKILL');
    await child.exited;
    const scratchPath = join(workspace.dir, 'disks', `snapshift-${sessionId.slice(0, 8)}-fleece-0.qcow2`);
    // QEMU stops answering but lives on (SIGSTOP): it still holds the scratch image open.
    process.kill(daemon.pid, 'SIGSTOP');
    try {
      const held = await huntVmSnapshots(catalog);
      assert.deepEqual(held.map((action) => action.action), ['left-in-place'], JSON.stringify(held));
      assert.match(held[0]!.detail, /holds the scratch image open/);
      assert.ok(existsSync(scratchPath), 'the scratch image stays');
      assert.equal(catalog.listVmSnapshotLedger().length, 1, 'and so does the row');
    } finally {
      process.kill(daemon.pid, 'SIGCONT');
    }
    await daemon.kill(); // QEMU gone: nobody holds the scratch image any more
    const hunted = await huntVmSnapshots(catalog);
    assert.deepEqual(hunted.map((action) => [action.action, action.overlayPath]), [['removed-fleecing', scratchPath]], JSON.stringify(hunted));
    assert.match(hunted[0]!.detail, /QEMU is not running/);
    assert.equal(existsSync(scratchPath), false, 'the scratch image is deleted');
    assert.deepEqual(catalog.listVmSnapshotLedger(), [], 'the row is cleared');
  });
});

describe('fleecing a real TCG guest through the Hypervisor interface (a VM runs no NBD server: its exports share the one we start)', () => {
  // The guest lives inside the lab, so the lab's own teardown ends it.
  const lab = withLab();
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let catalog: Catalog;
  let target: VmTarget;
  let vm: LabVm;
  let labQmp: QmpClient;
  let runDir: string;
  const home = () => join(workspace.dir, 'home');

  before(async () => {
    workspace = await makeWorkspace('fleece-vm');
    await mkdir(home());
    runDir = join(workspace.dir, 'run');
    await mkdir(runDir);
    catalog = Catalog.open(home());
    await lab().createVm('f1', { datastore: 'btrfs', sizeBytes: 256 * MiB, fillBytes: 64 * MiB });
    vm = await lab().startVm('f1', { rateMiBps: 4 });
    target = catalog.addQemuVm({ name: 'f1', qmpSocketPath: vm.qmpSocketPath });
    await vm.waitForHeartbeats(2, 20_000);
    labQmp = await QmpClient.connect(vm.labQmpSocketPath);
  });

  after(async () => {
    await labQmp?.close();
    catalog?.close();
    await workspace?.cleanup();
  });

  const writesSoFar = async (): Promise<number> => (await vm.heartbeats()).at(-1)?.writes ?? 0;
  /** The guest's disk is its own node again: no filter, job, node or scratch file of ours. */
  async function assertVmBackToItsDisk(): Promise<void> {
    const [device] = await labQmp.execute<Array<{ inserted?: { 'node-name': string } }>>('query-block');
    assert.equal(device?.inserted?.['node-name'], vm.blockNames.formatNode, 'the guest device reads its own disk node');
    assert.deepEqual(await labQmp.execute('query-block-jobs'), [], 'no job');
    assert.deepEqual([...(await blockNodeNames(labQmp))].filter((name) => name.startsWith('snapshift-')), [], 'no node of ours');
    assert.deepEqual(await labQmp.execute('query-block-exports'), [], 'no export');
    assert.deepEqual((await readdir(dirname(vm.diskPath))).filter((name) => name.startsWith('snapshift-')), [], 'no scratch file');
  }

  test('the point in time is hash-exact while the guest writes; two exports of it at once, the first disposed first; the guest runs on', async () => {
    // "Quiescing" by pausing the guest: QEMU drains and flushes on stop, so a reflink copy of the image then is
    // the point in time the fleecing transaction (run between freeze and thaw) must serve.
    const reference = join(lab().datastore('btrfs').mountPoint, 'reference.qcow2');
    const quiesce = {
      freeze: async () => {
        await labQmp.execute('stop');
        await exec('cp', ['--reflink=always', vm.diskPath, reference]);
      },
      thaw: async () => void (await labQmp.execute('cont')),
    };
    const writesBefore = await writesSoFar();
    const sessionId = randomUUID();
    let md5: string;
    let stats: FleeceStats;
    let socketPath: string;
    {
      await using hypervisorVm = await openVm(target);
      const disks = await hypervisorVm.listDisks();
      assert.deepEqual(disks.map((disk) => disk.name), ['vda']);
      await using fleece = await hypervisorVm.startFleecing(disks, { tag: sessionId.slice(0, 8), ledger: vmSnapshotLedger(catalog, target, sessionId), runDir, quiesce });
      assert.equal((await labQmp.execute<{ status: string }>('query-status')).status, 'running', 'thawed: the guest runs');
      assert.deepEqual((await hypervisorVm.listDisks()).map((disk) => disk.nodeName), [vm.blockNames.formatNode], 'the disk is listed under its filter');
      const first = await fleece.exportDisk(disks[0]!, 0);
      const second = await fleece.exportDisk(disks[0]!, 0);
      socketPath = second.socketPath;
      assert.equal(first.socketPath, second.socketPath, 'one NBD server for both');
      assert.ok(socketPath.startsWith(runDir), `the server we started, on a socket in runDir (${socketPath})`);
      await first[Symbol.asyncDispose]();
      md5 = await md5OfExport(second.socketPath, second.exportName, 25); // paced: the guest writes meanwhile
      await fleece.verifyIntact?.();
      stats = await fleece.release();
    }
    assert.equal(md5, await md5OfImage(reference, 'qcow2', workspace.dir), 'what was read is the guest\'s disk at the point in time');
    assert.ok(stats.scratchBytes > 0, `the guest overwrote data of the point in time while it was read (scratch ${stats.scratchBytes} bytes)`);
    assert.equal(existsSync(socketPath), false, 'our NBD server went with the last export');
    assert.deepEqual(catalog.listVmSnapshotLedger(), [], 'no ledger row');
    await assertVmBackToItsDisk();
    const writesAfter = await writesSoFar();
    for (const deadline = Date.now() + 10_000; (await writesSoFar()) <= writesAfter && Date.now() < deadline; ) await sleep(200);
    assert.ok((await writesSoFar()) > writesAfter && writesAfter > writesBefore, 'the guest wrote during and after the fleecing');
    console.log(`real guest: fleecing lifetime ${fmt(stats.lifetimeMs)} ms, scratch ${(stats.scratchBytes / MiB).toFixed(2)} MiB`);
  });

  test('a task SIGKILLed with fleecing of the VM active: the hunt removes scratch image and filter; the guest runs on, writing, and loses nothing', async () => {
    const sessionId = randomUUID();
    const child = await startFleecingTask(home(), target.name, sessionId, runDir);
    assert.equal((await labQmp.execute<unknown[]>('query-block-jobs')).length, 1, 'fleecing runs');
    process.kill(child.pid, 'SIGKILL');
    assert.equal(await child.exited, 'SIGKILL', child.output());
    const hunted = await huntVmSnapshots(catalog);
    assert.deepEqual(hunted.map((action) => [action.action, basename(action.overlayPath)]), [['removed-fleecing', `snapshift-${sessionId.slice(0, 8)}-fleece-0.qcow2`]], JSON.stringify(hunted));
    assert.deepEqual(catalog.listVmSnapshotLedger(), [], 'the row is cleared');
    await assertVmBackToItsDisk();
    const writesAfterHunt = await writesSoFar();
    for (const deadline = Date.now() + 10_000; (await writesSoFar()) <= writesAfterHunt && Date.now() < deadline; ) await sleep(200);
    assert.ok((await writesSoFar()) > writesAfterHunt, 'the guest writes on');
    // The killed task's NBD server (in runDir) still runs in QEMU: the next task on this runDir adopts it.
    await labQmp.close();
    const stopped = await vm.stop();
    assert.equal(await md5OfImage(vm.diskPath, 'qcow2', workspace.dir), stopped.md5, 'the image holds exactly what the guest wrote, to its last write');
  });
});
