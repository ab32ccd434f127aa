// Processing modes benchmark: what a backup costs a writing guest in regular mode vs storage-snapshot mode.
// A real lab guest writes 4 MiB/s to a 2 GiB qcow2 on btrfs; the copy is throttled (a slow production link),
// so regular mode holds its VM snapshot for the whole copy while storage-snapshot mode holds it only until
// the btrfs snapshot. Runs alternate between the modes. Every backup starts from the same disk (a reflink
// of the freshly filled one) and a freshly booted guest: the guest writes 64 KiB blocks at random offsets,
// each of which turns a whole 1 MiB chunk into data to read, so without the reset every later run would read
// more (up to the whole 2 GiB at 50 MB/s) and the runs would neither compare nor stay short.
//   npm run bench -- modes [--runs 5] [--rate-mbps 50] [--fill-mib 600]
// Bars: storage-snapshot VM-snapshot lifetime <= 0.3 s (median) and >= 20x shorter than regular.
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { Catalog } from '../src/catalog/index.ts';
import { formatBytes, formatColumns, formatDuration } from '../src/cli/format.ts';
import { exec } from '../src/core/exec.ts';
import { Lab, useSharedTestCache, type LabVm } from '../src/lab/index.ts';
import { runBackup, type ProcessingMode } from '../src/processing/backup-run.ts';
import type { TaskStats } from '../src/processing/task-stats.ts';
import { initRepository, openRepository } from '../src/repository/index.ts';

const MiB = 1024 * 1024;
const modes: ProcessingMode[] = ['regular', 'storage-snapshot'];
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
    },
  });
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
    for (let run = 1; run <= runs; run++) {
      for (const mode of modes) {
        const guest = await freshGuest();
        const backup = await runBackup({ vms: [catalog.getVm('bench')!], mode, repository, catalog, runDir: join(root, 'run'), maxReadBytesPerSecond, failoverToRegular: false });
        const outcome = backup.outcomes[0]!;
        if (!outcome.result) throw outcome.error ?? new Error(`${mode} backup failed`);
        const stats = outcome.result.stats;
        results.get(mode)!.push(stats);
        if (!(await guest.isRunning())) throw new Error(`the guest stopped during the ${mode} backup`);
        const heartbeat = (await guest.heartbeats()).at(-1);
        if (heartbeat && heartbeat.errors > 0) throw new Error(`the guest saw ${heartbeat.errors} write errors during the ${mode} backup`);
        guestWritten.push(heartbeat?.writtenMiB ?? 0);
        process.stdout.write(
          `  run ${run} ${mode.padEnd(16)} VM snapshot ${formatDuration(stats.vmSnapshotLifetimeMs).padStart(8)}, delta ${formatBytes(stats.deltaBytesAtCommit).padStart(9)}, commit ${formatDuration(stats.commitMs).padStart(6)}, read ${formatBytes(stats.readBytes)} in ${formatDuration(stats.durationMs)}\n`,
        );
      }
    }

    const medianOf = (mode: ProcessingMode, pick: (stats: TaskStats) => number) => median(results.get(mode)!.map(pick));
    const lifetime = (mode: ProcessingMode) => medianOf(mode, (stats) => stats.vmSnapshotLifetimeMs);
    const ratio = lifetime('regular') / Math.max(0.001, lifetime('storage-snapshot'));
    const lifetimePass = lifetime('storage-snapshot') <= maxStorageLifetimeMs;
    const ratioPass = ratio >= minLifetimeRatio;
    process.stdout.write(
      `\nmedians over ${runs} run(s) per mode:\n${formatColumns(
        ['', ...modes],
        [
          ['VM-snapshot lifetime', ...modes.map((mode) => formatDuration(lifetime(mode)))],
          ['delta at commit', ...modes.map((mode) => formatBytes(medianOf(mode, (stats) => stats.deltaBytesAtCommit)))],
          ['commit time', ...modes.map((mode) => formatDuration(medianOf(mode, (stats) => stats.commitMs)))],
          ['storage-snapshot lifetime', ...modes.map((mode) => (mode === 'regular' ? '-' : formatDuration(medianOf(mode, (stats) => stats.storageSnapshotLifetimeMs ?? 0))))],
          ['read', ...modes.map((mode) => formatBytes(medianOf(mode, (stats) => stats.readBytes)))],
          ['backup duration', ...modes.map((mode) => formatDuration(medianOf(mode, (stats) => stats.durationMs)))],
        ],
      )}\n\n` +
        `storage-snapshot VM-snapshot lifetime ${formatDuration(lifetime('storage-snapshot'))} (bar <= ${maxStorageLifetimeMs} ms): ${lifetimePass ? 'PASS' : 'FAIL'}\n` +
        `regular / storage-snapshot lifetime ratio ${ratio.toFixed(1)}x (bar >= ${minLifetimeRatio}x): ${ratioPass ? 'PASS' : 'FAIL'}\n` +
        `the guest kept writing through every backup (${median(guestWritten)} MiB per boot, median; no write errors); bench took ${formatDuration(performance.now() - started)}\n`,
    );
    if (!lifetimePass || !ratioPass) process.exitCode = 1;
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
