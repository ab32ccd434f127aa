// Processing modes benchmark: what a backup costs a writing guest in each of the three modes, side by side.
// A real lab guest writes 4 MiB/s to a 2 GiB qcow2 on btrfs; the copy is throttled (a slow production link),
// so regular mode holds its VM snapshot for the whole copy, storage-snapshot mode holds it only until the
// btrfs snapshot, and fleecing holds no VM snapshot at all (a copy-before-write filter with a scratch image
// lives for the whole copy instead, and there is nothing to commit). The guest's write latency during each
// backup comes from a latency histogram on its disk in QEMU's block layer. Runs alternate between the modes. Every backup starts from the same disk (a reflink
// of the freshly filled one) and a freshly booted guest: the guest writes 64 KiB blocks at random offsets,
// each of which turns a whole 1 MiB chunk into data to read, so without the reset every later run would read
// more (up to the whole 2 GiB at 50 MB/s) and the runs would neither compare nor stay short.
//   npm run bench -- modes [--runs 5] [--rate-mbps 50] [--fill-mib 600] [--modes regular,fleecing]
// Bars: storage-snapshot VM-snapshot lifetime <= 0.3 s (median) and >= 20x shorter than regular; fleecing
// commits nothing and its scratch stays below regular mode's delta.
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { Catalog } from '../src/catalog/index.ts';
import { formatBytes, formatColumns, formatDuration } from '../src/cli/format.ts';
import { exec } from '../src/core/exec.ts';
import { Lab, useSharedTestCache, type LabVm } from '../src/lab/index.ts';
import { isProcessingMode, processingModes, runBackup, type ProcessingMode } from '../src/processing/backup-run.ts';
import type { TaskStats } from '../src/processing/task-stats.ts';
import { initRepository, openRepository } from '../src/repository/index.ts';
import { readWriteLatency, startWriteLatencyHistogram, type WriteLatency } from './write-latency.ts';

const MiB = 1024 * 1024;
/** The lab guest's disk device, whose write latency the histogram measures: virtio-blk-pci's backend child holds the block backend. */
const guestDevice = '/machine/peripheral/vda/virtio-backend';
const maxStorageLifetimeMs = 300;
const minLifetimeRatio = 20;

export async function main(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      runs: { type: 'string', default: '5' },
      'rate-mbps': { type: 'string', default: '50' },
      'fill-mib': { type: 'string', default: '600' },
      'write-mibps': { type: 'string', default: '4' },
      modes: { type: 'string', default: 'regular,storage-snapshot,fleecing' },
    },
  });
  const modes = values.modes.split(',').map((mode) => mode.trim());
  if (!modes.every(isProcessingMode)) throw new Error(`--modes: each of ${processingModes.join(', ')}`);
  const runs = Number(values.runs);
  const maxReadBytesPerSecond = Number(values['rate-mbps']) * 1e6;
  const fillBytes = Number(values['fill-mib']) * MiB;
  const writeMiBps = Number(values['write-mibps']);
  if (!(Number.isInteger(runs) && runs >= 1 && maxReadBytesPerSecond > 0 && fillBytes > 0)) throw new Error('--runs must be a whole number >= 1, --rate-mbps and --fill-mib positive');

  useSharedTestCache(); // the guest kernel is downloaded once per machine, not once per bench run
  const root = await mkdtemp('/var/tmp/snapshift-bench-modes-');
  const started = performance.now();
  try {
    const lab = await Lab.up({ dir: join(root, 'lab') });
    const vmRecord = await lab.createVm('bench', { datastore: 'btrfs', sizeBytes: 2 * 1024 * MiB, fillBytes });
    const pristine = join(lab.datastore('btrfs').mountPoint, 'pristine.qcow2');
    await exec('cp', ['--reflink=always', vmRecord.diskPath, pristine]);
    let vm: LabVm | undefined;
    /** A freshly booted guest on the pristine disk, already writing. */
    const freshGuest = async (): Promise<LabVm> => {
      if (vm) await vm.kill();
      await exec('cp', ['--reflink=always', pristine, vmRecord.diskPath]);
      vm = await lab.startVm('bench', { rateMiBps: writeMiBps });
      return vm;
    };
    const guestWritten: number[] = [];
    await mkdir(join(root, 'home'));
    using catalog = Catalog.open(join(root, 'home'));
    // The QMP socket path is the same on every boot of the VM.
    catalog.addHost({ name: 'bench', kind: 'qemu', qmpSocketPath: (await lab.status()).vms[0]!.qmpSocketPath, nbdSocketPath: null });
    await initRepository(join(root, 'repo'), { password: 'bench', encryption: true });
    await using repository = await openRepository(join(root, 'repo'), { password: 'bench' });
    process.stdout.write(`guest writes ${writeMiBps} MiB/s to a 2 GiB qcow2 on btrfs with ${formatBytes(fillBytes)} of data; copy capped at ${values['rate-mbps']} MB/s; ${runs} run(s) per mode, each on a fresh boot from the same disk\n`);

    const results = new Map<ProcessingMode, TaskStats[]>(modes.map((mode) => [mode, []]));
    const latencies = new Map<ProcessingMode | 'none', WriteLatency[]>([...modes, 'none' as const].map((mode) => [mode, []]));
    const qmpSocketPath = (await lab.status()).vms[0]!.qmpSocketPath;
    for (let run = 1; run <= runs; run++) {
      // The yardstick: the same guest writing with no backup running, over a comparable window.
      await freshGuest();
      await startWriteLatencyHistogram(qmpSocketPath, guestDevice);
      await new Promise((resolve) => setTimeout(resolve, 10_000));
      latencies.get('none')!.push(await readWriteLatency(qmpSocketPath, guestDevice));
      for (const mode of modes) {
        const guest = await freshGuest();
        await startWriteLatencyHistogram(qmpSocketPath, guestDevice);
        const backup = await runBackup({ vms: [catalog.getVm('bench')!], mode, repository, catalog, runDir: join(root, 'run'), maxReadBytesPerSecond, failoverToRegular: false });
        const outcome = backup.outcomes[0]!;
        if (!outcome.result) throw outcome.error ?? new Error(`${mode} backup failed`);
        const stats = outcome.result.stats;
        results.get(mode)!.push(stats);
        const latency = await readWriteLatency(qmpSocketPath, guestDevice);
        latencies.get(mode)!.push(latency);
        if (!(await guest.isRunning())) throw new Error(`the guest stopped during the ${mode} backup`);
        const heartbeat = (await guest.heartbeats()).at(-1);
        if (heartbeat && heartbeat.errors > 0) throw new Error(`the guest saw ${heartbeat.errors} write errors during the ${mode} backup`);
        guestWritten.push(heartbeat?.writtenMiB ?? 0);
        process.stdout.write(
          `  run ${run} ${mode.padEnd(16)} VM snapshot ${formatDuration(stats.vmSnapshotLifetimeMs).padStart(8)}, delta ${formatBytes(stats.deltaBytesAtCommit).padStart(9)}, ` +
            `scratch ${formatBytes(stats.scratchBytes ?? 0).padStart(9)}, commit ${formatDuration(stats.commitMs).padStart(6)}, ` +
            `guest writes p50 ${latency.p50Ms.toFixed(1)} ms p99 ${latency.p99Ms.toFixed(1)} ms (${latency.writes}), read ${formatBytes(stats.readBytes)} in ${formatDuration(stats.durationMs)}\n`,
        );
      }
    }

    const medianOf = (mode: ProcessingMode, pick: (stats: TaskStats) => number) => median(results.get(mode)!.map(pick));
    const lifetime = (mode: ProcessingMode) => medianOf(mode, (stats) => stats.vmSnapshotLifetimeMs);
    const latencyOf = (mode: ProcessingMode | 'none', pick: (latency: WriteLatency) => number) => `${median(latencies.get(mode)!.map(pick)).toFixed(1)} ms`;
    const has = (mode: ProcessingMode) => modes.includes(mode);
    const dash = '-';
    process.stdout.write(
      `\nmedians over ${runs} run(s) per mode (latency: QEMU's block-layer histogram, bins ~8 per decade, each figure a bin's upper edge):\n${formatColumns(
        ['', 'no backup', ...modes],
        [
          ['VM-snapshot lifetime', dash, ...modes.map((mode) => (mode === 'fleecing' ? 'none' : formatDuration(lifetime(mode))))],
          ['fleecing lifetime', dash, ...modes.map((mode) => (mode === 'fleecing' ? formatDuration(medianOf(mode, (stats) => stats.fleecingLifetimeMs ?? 0)) : dash))],
          ['delta at commit / scratch', dash, ...modes.map((mode) => formatBytes(medianOf(mode, (stats) => (mode === 'fleecing' ? (stats.scratchBytes ?? 0) : stats.deltaBytesAtCommit))))],
          ['commit time', dash, ...modes.map((mode) => (mode === 'fleecing' ? 'none' : formatDuration(medianOf(mode, (stats) => stats.commitMs))))],
          ['storage-snapshot lifetime', dash, ...modes.map((mode) => (mode === 'storage-snapshot' ? formatDuration(medianOf(mode, (stats) => stats.storageSnapshotLifetimeMs ?? 0)) : dash))],
          ['guest write p50', latencyOf('none', (l) => l.p50Ms), ...modes.map((mode) => latencyOf(mode, (l) => l.p50Ms))],
          ['guest write p99', latencyOf('none', (l) => l.p99Ms), ...modes.map((mode) => latencyOf(mode, (l) => l.p99Ms))],
          ['read', dash, ...modes.map((mode) => formatBytes(medianOf(mode, (stats) => stats.readBytes)))],
          ['backup duration', dash, ...modes.map((mode) => formatDuration(medianOf(mode, (stats) => stats.durationMs)))],
        ],
      )}\n\n`,
    );
    let pass = true;
    if (has('storage-snapshot')) {
      const lifetimePass = lifetime('storage-snapshot') <= maxStorageLifetimeMs;
      pass &&= lifetimePass;
      process.stdout.write(`storage-snapshot VM-snapshot lifetime ${formatDuration(lifetime('storage-snapshot'))} (bar <= ${maxStorageLifetimeMs} ms): ${lifetimePass ? 'PASS' : 'FAIL'}\n`);
      if (has('regular')) {
        const ratio = lifetime('regular') / Math.max(0.001, lifetime('storage-snapshot'));
        pass &&= ratio >= minLifetimeRatio;
        process.stdout.write(`regular / storage-snapshot lifetime ratio ${ratio.toFixed(1)}x (bar >= ${minLifetimeRatio}x): ${ratio >= minLifetimeRatio ? 'PASS' : 'FAIL'}\n`);
      }
    }
    if (has('fleecing')) {
      const committed = medianOf('fleecing', (stats) => stats.commitMs + stats.deltaBytesAtCommit);
      const scratch = medianOf('fleecing', (stats) => stats.scratchBytes ?? 0);
      const fleecePass = committed === 0 && (!has('regular') || scratch <= medianOf('regular', (stats) => stats.deltaBytesAtCommit));
      pass &&= fleecePass;
      process.stdout.write(`fleecing: no delta, no commit; scratch ${formatBytes(scratch)}${has('regular') ? ` vs regular delta ${formatBytes(medianOf('regular', (stats) => stats.deltaBytesAtCommit))}` : ''}: ${fleecePass ? 'PASS' : 'FAIL'}\n`);
    }
    process.stdout.write(`the guest kept writing through every backup (${median(guestWritten)} MiB per boot, median; no write errors); bench took ${formatDuration(performance.now() - started)}\n`);
    if (!pass) process.exitCode = 1;
  } finally {
    await Lab.down(join(root, 'lab'));
    await rm(root, { recursive: true, force: true });
  }
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}
