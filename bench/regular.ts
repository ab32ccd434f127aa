// Regular-mode read benchmark: how fast a backup reads a VM disk through the VM's own NBD export, against
// nbdcopy reading the same export to null: in the same run. Guest-less (qemu-storage-daemon holds the disk).
//   npm run bench -- regular [--size-gib 4] [--data-gib 2] [--read-ahead 4,8,16] [--repo-dir /var/tmp/…] [--keep]
// --repo-dir /dev/shm puts the repository in memory: the pipeline without the disk, to tell the two apart.
// The product target: backup read rate >= 0.7x nbdcopy.
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { Catalog } from '../src/catalog/index.ts';
import { exec } from '../src/core/exec.ts';
import { copyDisk, isAllZero, type DiskCopyStats } from '../src/datamover/disk-copier.ts';
import { NbdDiskSource } from '../src/datamover/nbd-disk-source.ts';
import { NbdClient } from '../src/datamover/nbd/index.ts';
import { QmpClient } from '../src/hypervisor/qemu/qmp-client.ts';
import { randomBytes } from '../src/lab/nbd-writer.ts';
import { StorageDaemon } from '../src/lab/storage-daemon.ts';
import { runBackup } from '../src/processing/backup-run.ts';
import type { TaskStats } from '../src/processing/task-stats.ts';
import { initRepository, openRepository, type DiskWriter } from '../src/repository/index.ts';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
/** Data and holes alternate in runs of this size, so the extent map matters as on a real disk. */
const runBytes = 64 * MiB;

const mbps = (bytes: number, ms: number): number => bytes / 1e6 / (ms / 1000);
const fmt = (rate: number): string => `${rate.toFixed(0).padStart(5)} MB/s`;

export async function main(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      'size-gib': { type: 'string', default: '4' },
      'data-gib': { type: 'string', default: '2' },
      'read-ahead': { type: 'string', default: '4,8,16' },
      'repo-dir': { type: 'string', default: '' },
      keep: { type: 'boolean', default: false },
    },
  });
  const sizeBytes = Number(values['size-gib']) * GiB;
  const dataBytes = Number(values['data-gib']) * GiB;
  const readAheads = values['read-ahead'].split(',').map(Number);
  if (!(dataBytes > 0 && dataBytes * 2 <= sizeBytes) || readAheads.some((n) => !(n >= 1))) throw new Error('need 0 < data <= size/2 and read-ahead values >= 1');

  const root = await mkdtemp('/var/tmp/snapshift-bench-regular-');
  try {
    await mkdir(join(root, 'home'));
    const image = join(root, 'disk.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(sizeBytes)]);
    await using daemon = await StorageDaemon.start({ dir: root, images: [{ path: image, format: 'qcow2', nodeName: 'disk0' }] });

    let started = performance.now();
    const dataRegions = await fillAlternating(daemon, dataBytes);
    process.stdout.write(`wrote ${dataBytes / GiB} GiB of random data into a ${sizeBytes / GiB} GiB qcow2 (${dataRegions} runs of ${runBytes / MiB} MiB, holes between) in ${((performance.now() - started) / 1000).toFixed(1)} s\n`);

    // nbdcopy reads the base node through a read-only export on the same NBD server the backup uses.
    {
      await using qmp = await QmpClient.connect(daemon.qmpSocketPath);
      await qmp.execute('block-export-add', { type: 'nbd', id: 'bench-ro', 'node-name': 'disk0', name: 'bench-ro', writable: false });
    }
    const uri = `nbd+unix:///bench-ro?socket=${daemon.nbdSocketPath}`;
    await exec('nbdcopy', [uri, 'null:'], { timeoutMs: 600_000 }); // warm-up: qcow2 metadata cache, page cache
    const nbdcopyRates: number[] = [];
    for (let round = 0; round < 3; round++) {
      started = performance.now();
      await exec('nbdcopy', [uri, 'null:'], { timeoutMs: 600_000 });
      nbdcopyRates.push(mbps(dataBytes, performance.now() - started));
    }
    const nbdcopyRate = median(nbdcopyRates);

    // Our read path alone (NBD client, extent map, zero check), into a writer that drops everything.
    const readOnly = new Map<number, DiskCopyStats>();
    for (const readAhead of readAheads) {
      await using source = await NbdDiskSource.open(daemon.nbdSocketPath, 'bench-ro');
      readOnly.set(readAhead, await copyDisk(source, nullWriter, { chunkSizeBytes: MiB, readAhead }));
    }
    const zeroCheckMs = timeZeroCheck(dataBytes);
    const repositoryAloneRate = await timeRepositoryAlone(values['repo-dir'] || root, dataBytes);

    // Full regular-mode backups (VM snapshot, export, copy, repository), each into a fresh repository.
    const backups = new Map<number, TaskStats>();
    const writerWait = new Map<number, number>();
    const unchanged = new Map<number, TaskStats>();
    for (const readAhead of readAheads) {
      const repoPath = join(values['repo-dir'] || root, `snapshift-bench-repo-${process.pid}-${readAhead}`);
      await initRepository(repoPath, { password: 'bench', encryption: true });
      await using repository = await openRepository(repoPath, { password: 'bench' });
      using catalog = Catalog.open(join(root, 'home'));
      catalog.addHost({ name: 'bench', kind: 'qemu', qmpSocketPath: daemon.qmpSocketPath, nbdSocketPath: daemon.nbdSocketPath });
      const run = await runBackup({ vms: [catalog.getVm('bench')!], mode: 'regular', repository, catalog, runDir: join(root, 'run'), readAhead });
      const outcome = run.outcomes[0]!;
      if (!outcome.result) throw outcome.error ?? new Error('backup failed');
      backups.set(readAhead, outcome.result.stats);
      // Again, unchanged: every chunk is a duplicate, so the repository only hashes and the read path shows.
      const again = (await runBackup({ vms: [catalog.getVm('bench')!], mode: 'regular', repository, catalog, runDir: join(root, 'run'), readAhead })).outcomes[0]!;
      if (!again.result) throw again.error ?? new Error('second backup failed');
      unchanged.set(readAhead, again.result.stats);
      writerWait.set(readAhead, (100 * outcome.result.stats.disks[0]!.writerWaitMs) / outcome.result.stats.disks[0]!.durationMs);
      await repository.close();
      await rm(repoPath, { recursive: true, force: true });
    }

    const backupRate = (stats: TaskStats) => mbps(stats.readBytes, stats.disks[0]!.durationMs);
    const best = [...backups.entries()].sort((a, b) => backupRate(b[1]) - backupRate(a[1]))[0]!;
    const ratio = backupRate(best[1]) / nbdcopyRate;
    const lines = [
      `snapshift regular-mode read benchmark: ${sizeBytes / GiB} GiB qcow2, ${dataBytes / GiB} GiB allocated (random), 1 MiB chunks, repository encrypted in ${values['repo-dir'] || root}`,
      `nbdcopy -> null:            ${fmt(nbdcopyRate)}  (median of ${nbdcopyRates.map((rate) => rate.toFixed(0)).join(', ')}; same export, after a warm-up pass)`,
      ...[...readOnly.entries()].map(([readAhead, stats]) => `read path -> null, RA ${String(readAhead).padEnd(2)}  ${fmt(mbps(stats.bytesRead, stats.durationMs))}  (NBD client + extent map + zero check, no repository)`),
      `zero check alone           ${fmt(mbps(dataBytes, zeroCheckMs))}  (worst case: isAllZero over ${dataBytes / GiB} GiB of all-zero chunks, ${(zeroCheckMs / 1000).toFixed(2)} s)`,
      `repository alone           ${fmt(repositoryAloneRate)}  (unique random 1 MiB chunks from memory into a fresh repository: hash, zstd, AES-GCM, packs)`,
      ...[...backups.entries()].map(
        ([readAhead, stats]) =>
          `backup, readAhead ${String(readAhead).padEnd(2)}     ${fmt(backupRate(stats))}  (read ${(stats.readBytes / MiB).toFixed(0)} MiB in ${(stats.disks[0]!.durationMs / 1000).toFixed(2)} s, ${writerWait.get(readAhead)!.toFixed(0)}% of it waiting for the repository; busy source ${stats.busyPercent.source}%, proxy ${stats.busyPercent.proxy}%, target ${stats.busyPercent.target}%)`,
      ),
      ...[...unchanged.entries()].map(
        ([readAhead, stats]) =>
          `again, unchanged, RA ${String(readAhead).padEnd(2)}   ${fmt(backupRate(stats))}  (all chunks duplicates: read + hash only; ${((100 * stats.disks[0]!.writerWaitMs) / stats.disks[0]!.durationMs).toFixed(0)}% waiting for the repository; ratio to nbdcopy ${(backupRate(stats) / nbdcopyRate).toFixed(2)}x)`,
      ),
      `best readAhead             ${best[0]} (first backup)`,
      `backup / nbdcopy           ${ratio.toFixed(2)}x (target >= 0.7x): ${ratio >= 0.7 ? 'PASS' : 'FAIL'}`,
      `peak RSS                   ${(process.resourceUsage().maxRSS / 1024).toFixed(0)} MiB (this process: NBD client, repository workers)`,
    ];
    process.stdout.write(`${lines.join('\n')}\n`);
  } finally {
    if (values.keep) process.stdout.write(`left ${root}\n`);
    else await rm(root, { recursive: true, force: true });
  }
}

/** Writes random data in `runBytes` runs with equal holes between, through the daemon's writable export. */
async function fillAlternating(daemon: StorageDaemon, dataBytes: number): Promise<number> {
  await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
  const pieceBytes = 4 * MiB;
  const inFlight: Array<Promise<void>> = [];
  let runs = 0;
  for (let written = 0; written < dataBytes; written += runBytes, runs++) {
    const runOffset = runs * 2 * runBytes;
    for (let at = 0; at < Math.min(runBytes, dataBytes - written); at += pieceBytes) {
      if (inFlight.length >= 4) await inFlight.shift();
      inFlight.push(nbd.write(runOffset + at, randomBytes(7, runOffset + at, pieceBytes)));
    }
  }
  await Promise.all(inFlight);
  await nbd.flush();
  return runs;
}

/** MB/s of `bytes` of unique random chunks written from memory into a fresh encrypted repository: its ceiling. */
async function timeRepositoryAlone(folder: string, bytes: number): Promise<number> {
  const repoPath = join(folder, `snapshift-bench-repo-${process.pid}-alone`);
  try {
    await initRepository(repoPath, { password: 'bench', encryption: true });
    await using repository = await openRepository(repoPath, { password: 'bench' });
    const pool = randomBytes(3, 0, 64 * MiB);
    const writer = await repository.startBackup({ vmName: 'bench-alone' });
    const disk = writer.addDisk('disk0', bytes);
    const started = performance.now();
    for (let offset = 0; offset < bytes; offset += MiB) {
      // A fresh buffer per chunk (the writer takes ownership), unique by its first 8 bytes.
      const chunk = Buffer.from(pool.subarray(offset % pool.length, (offset % pool.length) + MiB));
      chunk.writeDoubleLE(offset, 0);
      await disk.putChunk(offset, chunk);
    }
    await writer.settle();
    const rate = mbps(bytes, performance.now() - started);
    await writer.commit();
    return rate;
  } finally {
    await rm(repoPath, { recursive: true, force: true });
  }
}

/** A writer that keeps nothing: the copy without the repository. */
const nullWriter: DiskWriter = {
  putChunk: async () => undefined,
  putZero: async () => undefined,
};

/** Time isAllZero takes over `bytes` of all-zero 1 MiB chunks: its worst case (random data exits at once). */
function timeZeroCheck(bytes: number): number {
  const chunk = Buffer.alloc(MiB);
  const started = performance.now();
  for (let done = 0; done < bytes; done += MiB) if (!isAllZero(chunk)) throw new Error('zero chunk seen as data');
  return performance.now() - started;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}
