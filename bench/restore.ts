// Restore benchmark (issue 13): a 4 GiB disk holding ~1.9 GB of data (half random, half text-like; the rest
// never written) backed up into snapshift, restic and borg, then restored side by side in one run: snapshift
// raw (our own writer) and qcow2 (qemu-img reading our NBD server) against `restic restore` and
// `borg extract`. Every restore is checked bit for bit against the disk. The page cache is dropped before
// each restore where we may (root), so each reads its repository from the disk.
// The machine is shared and noisy: the restores run in rounds (each tool once per round, interleaved) and the
// median is reported. Each time is taken twice: when the tool returned, and after a `sync` that followed it
// (snapshift fsyncs before it returns; restic and borg leave their writes in the page cache).
// Options: --size-gib N (default 4), --data-gb G (default 1.9), --rounds N (default 3), --keep.
// Run it under `flock /tmp/snapshift-heavy.lock` on a shared machine.
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { initRepository, openRepository, type Repository } from '../src/repository/index.ts';
import { restoreDisk } from '../src/restore/disk-restore.ts';
import { seeded, textCorpus } from './repository.ts';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const chunkSize = MiB;

/** Whether chunk `n` holds data, so that `dataChunks` of `chunks` do, spread over the disk. */
function isDataChunk(n: number, chunks: number, dataChunks: number): boolean {
  return Math.floor(((n + 1) * dataChunks) / chunks) > Math.floor((n * dataChunks) / chunks);
}

/** A sparse disk image: data chunks alternate (by a hash) between random and text-like; the rest is a hole. */
export async function makeDisk(path: string, sizeBytes: number, dataBytes: number): Promise<void> {
  const corpus = textCorpus(16 * MiB);
  const chunks = sizeBytes / chunkSize;
  const dataChunks = Math.round(dataBytes / chunkSize);
  const handle = await open(path, 'w');
  try {
    await handle.truncate(sizeBytes);
    for (let n = 0; n < chunks; n++) {
      if (!isDataChunk(n, chunks, dataChunks)) continue;
      let chunk: Buffer;
      if (createHash('md5').update(String(n)).digest()[0]! % 2 === 0) chunk = seeded(n, chunkSize);
      else {
        const start = (n * 104_729) % (corpus.length - chunkSize);
        chunk = Buffer.from(corpus.subarray(start, start + chunkSize));
        chunk.writeUInt32LE(n, 0); // unique, yet text-like
      }
      await handle.write(chunk, 0, chunkSize, n * chunkSize);
    }
  } finally {
    await handle.close();
  }
}

export async function backupFile(repository: Repository, file: string, sizeBytes: number): Promise<string> {
  const writer = await repository.startBackup({ vmName: 'bench' });
  const disk = writer.addDisk('vda', sizeBytes);
  const handle = await open(file, 'r');
  try {
    for (let at = 0; at < sizeBytes; at += chunkSize) {
      const data = Buffer.allocUnsafeSlow(chunkSize);
      await handle.read(data, 0, chunkSize, at);
      await disk.putChunk(at, data);
    }
  } finally {
    await handle.close();
  }
  return (await writer.commit()).id;
}

async function md5Of(path: string): Promise<string> {
  const hash = createHash('md5');
  for await (const piece of createReadStream(path, { highWaterMark: 4 * MiB })) hash.update(piece as Buffer);
  return hash.digest('hex');
}

/** Drops the page cache (root only): each restore then reads its repository from the disk. */
async function dropCaches(): Promise<boolean> {
  try {
    await run('sync');
    await writeFile('/proc/sys/vm/drop_caches', '3\n');
    return true;
  } catch {
    return false;
  }
}

async function allocatedMiB(path: string): Promise<number> {
  return Number((await run('du', ['-sk', path])).stdout.split('\t')[0]) / 1024;
}

async function have(program: string): Promise<boolean> {
  return run('sh', ['-c', `command -v ${program}`]).then(() => true, () => false);
}

interface Result {
  name: string;
  /** Until the restore command returned; until `sync` after it returned too (the data on disk). */
  returnedMs: number[];
  durableMs: number[];
  allocatedMiB: number;
  exact: boolean;
}

const median = (values: number[]): number => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;

export async function main(args: string[]): Promise<void> {
  const option = (name: string, fallback: number) => (args.includes(name) ? Number(args[args.indexOf(name) + 1]) : fallback);
  const sizeBytes = Math.round(option('--size-gib', 4) * 1024) * MiB;
  const dataBytes = Math.round(option('--data-gb', 1.9) * 1e9);
  const rounds = Math.max(1, Math.round(option('--rounds', 3)));
  const root = await mkdtemp('/var/tmp/snapshift-bench-restore-');
  const disk = join(root, 'disk.img');
  const out = join(root, 'out');
  await mkdir(out);
  const say = (line: string) => process.stdout.write(`${line}\n`);
  try {
    say(`generating a ${sizeBytes / 2 ** 30} GiB disk with ${(dataBytes / 1e9).toFixed(2)} GB of data in ${disk} ...`);
    await makeDisk(disk, sizeBytes, dataBytes);
    const diskMd5 = await md5Of(disk);

    say('backing up into snapshift, restic and borg ...');
    const repoPath = join(root, 'snapshift');
    await initRepository(repoPath, { password: 'bench', encryption: true, compression: 'zstd:1' });
    let started = performance.now();
    let pointId: string;
    {
      await using repository = await openRepository(repoPath, { password: 'bench' });
      pointId = await backupFile(repository, disk, sizeBytes);
    }
    const backupMs: Record<string, number> = { snapshift: performance.now() - started };
    const resticEnv = { ...process.env, RESTIC_PASSWORD: 'bench', RESTIC_REPOSITORY: join(root, 'restic'), RESTIC_CACHE_DIR: join(root, 'restic-cache') };
    await run('restic', ['init'], { env: resticEnv });
    started = performance.now();
    await run('restic', ['backup', '--quiet', disk], { env: resticEnv, maxBuffer: 64 * MiB });
    backupMs.restic = performance.now() - started;
    const withBorg = await have('borg');
    const borgEnv = { ...process.env, BORG_PASSPHRASE: 'bench', BORG_REPO: join(root, 'borg'), BORG_BASE_DIR: join(root, 'borg-home'), BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK: 'yes' };
    if (withBorg) {
      await run('borg', ['init', '--encryption=repokey-blake2'], { env: borgEnv });
      started = performance.now();
      await run('borg', ['create', '--compression', 'lz4', '--sparse', '::disk', 'disk.img'], { env: borgEnv, cwd: root, maxBuffer: 64 * MiB });
      backupMs.borg = performance.now() - started;
    }
    const repoMiB = { snapshift: await allocatedMiB(repoPath), restic: await allocatedMiB(join(root, 'restic')), borg: withBorg ? await allocatedMiB(join(root, 'borg')) : 0 };

    const results = new Map<string, Result>();
    let cachesDropped = true;
    const measure = async (name: string, target: string, restore: () => Promise<void>, check: () => Promise<string>) => {
      cachesDropped = (await dropCaches()) && cachesDropped;
      const begin = performance.now();
      await restore();
      const returnedMs = performance.now() - begin;
      await run('sync');
      const durableMs = performance.now() - begin;
      const result = results.get(name) ?? { name, returnedMs: [], durableMs: [], allocatedMiB: 0, exact: true };
      result.returnedMs.push(returnedMs);
      result.durableMs.push(durableMs);
      result.allocatedMiB = await allocatedMiB(target);
      result.exact &&= (await check()) === diskMd5;
      results.set(name, result);
      say(`  ${name.padEnd(18)} ${(returnedMs / 1000).toFixed(1)} s, ${(durableMs / 1000).toFixed(1)} s with sync${result.exact ? '' : '  NOT BIT-EXACT'}`);
      await rm(target, { recursive: true, force: true });
    };

    const rssBefore = process.resourceUsage().maxRSS / 1024;
    await using repository = await openRepository(repoPath, { password: 'bench' });
    repository.pool(); // workers started before the clock, as a running CLI has them
    const resticTarget = join(out, 'restic');
    const borgTarget = join(out, 'borg');
    for (let round = 1; round <= rounds; round++) {
      say(`restoring, round ${round} of ${rounds} ...`);
      const rawTarget = join(out, 'vda.raw');
      await measure('snapshift raw', rawTarget, async () => {
        await restoreDisk(await repository.openRestorePoint(pointId), 'vda', rawTarget, { format: 'raw', force: true, chunkSizeBytes: repository.chunkSizeBytes });
      }, () => md5Of(rawTarget));
      const qcow2Target = join(out, 'vda.qcow2');
      await measure('snapshift qcow2', qcow2Target, async () => {
        await restoreDisk(await repository.openRestorePoint(pointId), 'vda', qcow2Target, { format: 'qcow2', force: true, chunkSizeBytes: repository.chunkSizeBytes });
      }, async () => {
        const raw = join(out, 'vda-from-qcow2.raw');
        await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', qcow2Target, raw]);
        try {
          return await md5Of(raw);
        } finally {
          await rm(raw, { force: true });
        }
      });
      await measure('restic restore', resticTarget, async () => {
        await run('restic', ['restore', 'latest', '--target', resticTarget], { env: resticEnv, maxBuffer: 64 * MiB });
      }, () => md5Of(join(resticTarget, disk)));
      if (withBorg) {
        await mkdir(borgTarget);
        await measure('borg extract', borgTarget, async () => {
          await run('borg', ['extract', '--sparse', '::disk'], { env: borgEnv, cwd: borgTarget, maxBuffer: 64 * MiB });
        }, () => md5Of(join(borgTarget, 'disk.img')));
      }
    }
    const rssPeakMiB = process.resourceUsage().maxRSS / 1024;

    const restic = results.get('restic restore')!;
    const mbps = (bytes: number, ms: number) => (bytes / 1e6 / (ms / 1000)).toFixed(0);
    const seconds = (ms: number) => `${(ms / 1000).toFixed(1)} s`;
    const lines = [
      '',
      `restore benchmark: ${sizeBytes / 2 ** 30} GiB disk, ${(dataBytes / 1e9).toFixed(2)} GB of data (half random, half text-like), the rest never written; median of ${rounds} round(s)`,
      `repositories: snapshift ${repoMiB.snapshift.toFixed(0)} MiB (zstd:1, AES-256-GCM, 1 MiB chunks, 2 workers), restic ${repoMiB.restic.toFixed(0)} MiB, ${withBorg ? `borg ${repoMiB.borg.toFixed(0)} MiB (lz4, repokey-blake2)` : 'borg not installed'}`,
      `backup times:  ${Object.entries(backupMs).map(([name, ms]) => `${name} ${seconds(ms)}`).join(', ')}`,
      `page cache ${cachesDropped ? 'dropped before each restore' : 'NOT dropped (not root): repositories may be read from memory'}`,
      '',
      `${'restore'.padEnd(16)} ${'on disk'.padStart(8)} ${'returned'.padStart(9)} ${'disk MB/s'.padStart(10)} ${'data MB/s'.padStart(10)} ${'allocated'.padStart(10)} ${'vs restic'.padStart(10)} ${'(returned)'.padStart(11)}  bit-exact  all rounds (on disk)`,
      ...[...results.values()].map((r) => {
        const durable = median(r.durableMs);
        const returned = median(r.returnedMs);
        return (
          `${r.name.padEnd(16)} ${seconds(durable).padStart(8)} ${seconds(returned).padStart(9)} ${mbps(sizeBytes, durable).padStart(10)} ${mbps(dataBytes, durable).padStart(10)} ` +
          `${`${r.allocatedMiB.toFixed(0)} MiB`.padStart(10)} ${`${(median(restic.durableMs) / durable).toFixed(2)}x`.padStart(10)} ${`${(median(restic.returnedMs) / returned).toFixed(2)}x`.padStart(11)}  ` +
          `${(r.exact ? 'yes' : 'NO').padEnd(9)}  ${r.durableMs.map(seconds).join(', ')}`
        );
      }),
      '',
      '"on disk": until the tool returned and a sync after it finished; "returned": until the tool returned (restic and borg have not flushed yet).',
      `peak RSS of this process: ${rssPeakMiB.toFixed(0)} MiB (${rssBefore.toFixed(0)} MiB before the restores, after generating and backing up)`,
    ];
    say(lines.join('\n'));
    if ([...results.values()].some((r) => !r.exact)) process.exitCode = 1;
  } finally {
    if (!args.includes('--keep')) await rm(root, { recursive: true, force: true });
    else say(`left ${root}`);
  }
}
