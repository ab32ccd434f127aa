// Incremental benchmark: a sparse qcow2 disk (default 10 GiB, 4 GiB allocated with incompressible data) served
// by qemu-storage-daemon; one full backup, then --runs incrementals with --changed-percent of the disk
// rewritten (whole 1 MiB chunks at random places in the allocated data) before each. Prints incremental time
// vs full time (bar: ≤ 5 %) and bytes read vs changed (bar: ≤ 1.1×), with peak RSS.
// Options: --size-gib N (10), --allocated-gib N (4), --changed-percent P (1), --runs N (3). Regular mode only:
// storage-snapshot mode would need the lab's datastores, and the CBT read path is the same.
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { Catalog } from '../src/catalog/index.ts';
import { exec } from '../src/core/exec.ts';
import { NbdClient } from '../src/datamover/nbd/index.ts';
import { randomBytes } from '../src/lab/nbd-writer.ts';
import { StorageDaemon } from '../src/lab/storage-daemon.ts';
import { runBackup } from '../src/processing/backup-run.ts';
import type { TaskStats } from '../src/processing/task-stats.ts';
import { initRepository, openRepository } from '../src/repository/index.ts';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const extentBytes = 64 * MiB;

function option(args: string[], name: string, fallback: number): number {
  const index = args.indexOf(`--${name}`);
  if (index < 0) return fallback;
  const value = Number(args[index + 1]);
  if (!Number.isFinite(value) || value <= 0) throw new Error(`--${name} needs a positive number`);
  return value;
}

/** Writes `pieces` (offset, seed) of `length` bytes with up to 8 writes in flight. */
async function writePieces(nbd: NbdClient, pieces: Array<{ offset: number; seed: number }>, length: number): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < pieces.length) {
      const piece = pieces[next++]!;
      await nbd.write(piece.offset, randomBytes(piece.seed, piece.offset, length));
    }
  };
  await Promise.all(Array.from({ length: 8 }, worker));
  await nbd.flush();
}

export async function main(args: string[]): Promise<void> {
  const sizeBytes = option(args, 'size-gib', 10) * GiB;
  const allocatedBytes = option(args, 'allocated-gib', 4) * GiB;
  const changedPercent = option(args, 'changed-percent', 1);
  const runs = option(args, 'runs', 3);
  const dir = await mkdtemp(join(process.env.SNAPSHIFT_TEST_TMP ?? '/var/tmp', 'ss-bench-incr-'));
  let daemon: StorageDaemon | undefined;
  try {
    await mkdir(join(dir, 'home'));
    const imagePath = join(dir, 'disk.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', imagePath, String(sizeBytes)]);
    daemon = await StorageDaemon.start({ dir, images: [{ path: imagePath, format: 'qcow2', nodeName: 'disk0' }] });

    // Allocated data: extents of 64 MiB spread evenly over the disk, holes between them.
    const extents = Math.floor(allocatedBytes / extentBytes);
    const stride = Math.floor(sizeBytes / extents / MiB) * MiB;
    let seed = 1;
    let started = performance.now();
    {
      await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
      const pieces: Array<{ offset: number; seed: number }> = [];
      for (let extent = 0; extent < extents; extent++) for (let at = 0; at < extentBytes; at += 4 * MiB) pieces.push({ offset: extent * stride + at, seed: seed++ });
      await writePieces(nbd, pieces, 4 * MiB);
    }
    console.log(`generated ${(extents * extentBytes) / GiB} GiB of random data on a ${sizeBytes / GiB} GiB sparse qcow2 in ${((performance.now() - started) / 1000).toFixed(1)} s`);

    const catalog = Catalog.open(join(dir, 'home'));
    await initRepository(join(dir, 'repo'), { password: 'bench', encryption: true });
    await using repository = await openRepository(join(dir, 'repo'), { password: 'bench' });
    catalog.addHost({ name: 'bench-vm', kind: 'qemu', qmpSocketPath: daemon.qmpSocketPath, nbdSocketPath: daemon.nbdSocketPath });
    const backup = async (): Promise<{ wallMs: number; stats: TaskStats }> => {
      const begun = performance.now();
      const run = await runBackup({ vms: [catalog.getVm('bench-vm')!], mode: 'regular', repository, catalog, runDir: join(dir, 'run') });
      const outcome = run.outcomes[0]!;
      if (outcome.error) throw outcome.error;
      return { wallMs: performance.now() - begun, stats: outcome.result!.stats };
    };

    const full = await backup();
    console.log(`full:        ${(full.wallMs / 1000).toFixed(2)} s wall, read ${(full.stats.readBytes / MiB).toFixed(0)} MiB, ${full.stats.rateMBps.toFixed(0)} MB/s processed`);

    // Changed chunks: distinct whole chunks inside the allocated extents.
    const changedChunks = Math.round((sizeBytes * changedPercent) / 100 / MiB);
    const chunksPerExtent = extentBytes / MiB;
    const results: Array<{ wallMs: number; changedBytes: number; stats: TaskStats }> = [];
    for (let round = 1; round <= runs; round++) {
      const chosen = new Set<number>();
      while (chosen.size < changedChunks) {
        const n = Math.floor(Math.random() * extents * chunksPerExtent);
        chosen.add(Math.floor(n / chunksPerExtent) * stride + (n % chunksPerExtent) * MiB);
      }
      {
        await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
        await writePieces(nbd, [...chosen].sort((a, b) => a - b).map((offset) => ({ offset, seed: seed++ })), MiB);
      }
      started = performance.now();
      const incremental = await backup();
      const disk = incremental.stats.disks[0]!;
      if (disk.cbtSource !== 'bitmap') throw new Error(`incremental ${round} fell back to a full read: ${disk.fallbackReason}`);
      results.push({ ...incremental, changedBytes: changedChunks * MiB });
      console.log(
        `incremental ${round}: ${(incremental.wallMs / 1000).toFixed(2)} s wall (${((incremental.wallMs / full.wallMs) * 100).toFixed(1)} % of full), ` +
          `changed ${changedChunks} MiB, CBT dirty ${((disk.dirtyBytes ?? 0) / MiB).toFixed(0)} MiB, read ${(disk.readBytes / MiB).toFixed(0)} MiB (${(disk.readBytes / (changedChunks * MiB)).toFixed(3)}× changed); ` +
          `task ${(incremental.stats.durationMs / 1000).toFixed(2)} s, copy ${(disk.durationMs / 1000).toFixed(2)} s, commit ${(incremental.stats.commitMs / 1000).toFixed(2)} s`,
      );
    }
    const worstTime = Math.max(...results.map((result) => result.wallMs / full.wallMs));
    const worstRead = Math.max(...results.map((result) => result.stats.readBytes / result.changedBytes));
    console.log(`worst incremental: ${(worstTime * 100).toFixed(1)} % of the full's time (bar ≤ 5 %: ${worstTime <= 0.05 ? 'met' : 'NOT met'}), read ${worstRead.toFixed(3)}× changed (bar ≤ 1.1×: ${worstRead <= 1.1 ? 'met' : 'NOT met'})`);
    console.log(`peak RSS ${(process.resourceUsage().maxRSS / 1024).toFixed(0)} MiB`);
    catalog.close();
  } finally {
    await daemon?.stop();
    await rm(dir, { recursive: true, force: true });
  }
}
