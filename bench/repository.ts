// Repository benchmark: write, restore-read, check --read-data and gc of N GiB of mixed data, against restic
// on the same file in the same run. Options: --size-gib N (default 2), --keep (leave the data for a look).
import { createCipheriv, createHash } from 'node:crypto';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { checkRepository, collectGarbage, forgetRestorePoints, initRepository, openRepository, type Repository } from '../src/repository/index.ts';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const chunkSize = MiB;

export function seeded(stream: number, length: number): Buffer {
  const iv = Buffer.alloc(16);
  iv.writeUInt32LE(stream, 0);
  return createCipheriv('aes-256-ctr', Buffer.alloc(32, 0x5a), iv).update(Buffer.alloc(length));
}

/** A text-like corpus: words from a small vocabulary in pseudo-random order (compresses ~3-4x with zstd-1). */
export function textCorpus(length: number): Buffer {
  const words = 'the of and to in is was for on are with as by at from this that which be or have an not disk block virtual machine backup snapshot restore chunk pack index repository host volume storage error warning info debug kernel process memory page file system user data log request response'.split(' ');
  const random = seeded(999, length);
  const parts: string[] = [];
  let size = 0;
  for (let i = 0; size < length; i++) {
    const word = words[random[i % length]! % words.length]!;
    const piece = (random[(i * 7) % length]! % 13 === 0 ? `\n${random.readUInt16LE(i % (length - 2))} ` : ' ') + word;
    parts.push(piece);
    size += piece.length;
  }
  return Buffer.from(parts.join('')).subarray(0, length);
}

/** Writes the mixed test disk: per MiB, 35% random, 30% text-like, 15% zero, 20% duplicates. */
async function makeDisk(path: string, sizeBytes: number): Promise<void> {
  const corpus = textCorpus(16 * MiB);
  const handle = await open(path, 'w');
  const chunks = sizeBytes / chunkSize;
  for (let n = 0; n < chunks; n++) {
    const kind = createHash('md5').update(String(n)).digest()[0]! % 20;
    let chunk: Buffer;
    if (kind < 7) chunk = seeded(n, chunkSize);
    else if (kind < 13) {
      const start = (n * 104_729) % (corpus.length - chunkSize);
      chunk = Buffer.from(corpus.subarray(start, start + chunkSize));
      chunk.writeUInt32LE(n, 0); // unique, yet text-like
    } else if (kind < 16) chunk = Buffer.alloc(chunkSize);
    else {
      const earlier = Math.max(0, n - 1 - (n % 64));
      chunk = seeded(earlier - (earlier % 2), chunkSize); // a random chunk seen before (roughly)
    }
    await handle.write(chunk, 0, chunkSize, n * chunkSize);
  }
  await handle.close();
}

async function backupFile(repository: Repository, file: string, sizeBytes: number, opts: { base?: string; changeFirstHalf?: boolean } = {}) {
  const writer = await repository.startBackup({ vmName: 'bench', baseRestorePointId: opts.base });
  const disk = writer.addDisk('vda', sizeBytes);
  const handle = await open(file, 'r');
  try {
    for (let at = 0, n = 0; at < sizeBytes; at += chunkSize, n++) {
      if (opts.changeFirstHalf && at >= sizeBytes / 2) continue;
      const data = Buffer.allocUnsafeSlow(chunkSize);
      await handle.read(data, 0, chunkSize, at);
      if (opts.changeFirstHalf) data.writeUInt32LE((0xdeadbeef ^ n) >>> 0, 8); // changed chunk
      await disk.putChunk(at, data);
    }
  } finally {
    await handle.close();
  }
  const summary = await writer.commit();
  return { summary, stats: writer.stats };
}

/** What the repository's disk sustains for 512 MiB written with fsync (dd), to read the write figure against. */
async function measureDiskWrite(folder: string): Promise<string> {
  const target = join(folder, 'dd-probe');
  try {
    const { stderr } = await run('dd', ['if=/dev/zero', `of=${target}`, 'bs=1M', 'count=512', 'conv=fsync']);
    return /, ([\d.]+ [MG]B\/s)/.exec(stderr)?.[1] ?? 'unknown';
  } finally {
    await rm(target, { force: true });
  }
}

const rate = (bytes: number, ms: number): string => `${(bytes / 1e6 / (ms / 1000)).toFixed(0)} MB/s`;

export async function main(args: string[]): Promise<void> {
  const sizeArg = args.indexOf('--size-gib');
  const sizeGiB = sizeArg >= 0 ? Number(args[sizeArg + 1]) : Number(process.env.BENCH_SIZE_GIB ?? 2);
  const sizeBytes = Math.round(sizeGiB * 1024) * MiB;
  const root = await mkdtemp('/var/tmp/snapshift-bench-');
  const file = join(root, 'disk.img');
  const repoPath = join(root, 'repo');
  const resticPath = join(root, 'restic');
  try {
    process.stdout.write(`generating ${sizeGiB} GiB of mixed data in ${file} ...\n`);
    await makeDisk(file, sizeBytes);
    const peakRssMiB = (): number => process.resourceUsage().maxRSS / 1024;
    const rssAfter: Record<string, number> = { generate: peakRssMiB() };
    await initRepository(repoPath, { password: 'bench', encryption: true, compression: 'zstd:1' });
    await using repository = await openRepository(repoPath, { password: 'bench' });

    let started = performance.now();
    const first = await backupFile(repository, file, sizeBytes);
    const writeMs = performance.now() - started;
    const s = first.stats;
    rssAfter.write = peakRssMiB();

    started = performance.now();
    const reader = await repository.openRestorePoint(first.summary.id);
    let readBytes = 0;
    for (let at = 0; at < sizeBytes; at += 4 * MiB) readBytes += (await reader.read('vda', at, Math.min(4 * MiB, sizeBytes - at))).length;
    const readMs = performance.now() - started;
    rssAfter.read = peakRssMiB();

    const check = await checkRepository(repository, { readDataPercent: 100 });
    if (check.problems.length > 0) throw new Error(`check found problems: ${check.problems[0]!.message}`);
    rssAfter.check = peakRssMiB();

    // gc: a second point that changes the first half of the disk; forget the first point; collect.
    await backupFile(repository, file, sizeBytes, { base: first.summary.id, changeFirstHalf: true });
    await forgetRestorePoints(repository, { keepLast: 1 });
    const gc = await collectGarbage(repository, { safetyWindowMs: 0 });
    rssAfter.gc = peakRssMiB();

    const indexBytesPerChunk = repository.index.memoryBytes / repository.index.size;
    const rssPeakMiB = process.resourceUsage().maxRSS / 1024;

    // The same write with the repository in memory (tmpfs): what the pipeline does when the disk is not the limit.
    const shmPath = await mkdtemp('/dev/shm/snapshift-bench-');
    let shmWriteMs: number;
    try {
      await initRepository(join(shmPath, 'repo'), { password: 'bench', encryption: true, compression: 'zstd:1' });
      await using shmRepository = await openRepository(join(shmPath, 'repo'), { password: 'bench' });
      shmRepository.pool();
      started = performance.now();
      await backupFile(shmRepository, file, sizeBytes);
      shmWriteMs = performance.now() - started;
    } finally {
      await rm(shmPath, { recursive: true, force: true });
    }
    const diskRate = await measureDiskWrite(root);

    process.stdout.write('running restic on the same file ...\n');
    const env = { ...process.env, RESTIC_PASSWORD: 'bench', RESTIC_REPOSITORY: resticPath, RESTIC_CACHE_DIR: join(root, 'restic-cache') };
    await run('restic', ['init'], { env });
    started = performance.now();
    await run('restic', ['backup', '--quiet', file], { env, maxBuffer: 64 * MiB });
    const resticMs = performance.now() - started;
    const resticBytes = (await run('du', ['-sb', resticPath])).stdout.split('\t')[0]!;

    const unique = s.compressedInBytes;
    const lines = [
      `snapshift repository benchmark, ${sizeGiB} GiB mixed data (35% random, 30% text, 15% zero, 20% duplicate), chunk 1 MiB, zstd:1 + AES-256-GCM, 2 workers`,
      `write           ${rate(sizeBytes, writeMs)}  (${(writeMs / 1000).toFixed(1)} s; worker busy ${(s.workerBusyMs / 1000).toFixed(1)} s, write busy ${(s.writeBusyMs / 1000).toFixed(1)} s)`,
      `write to tmpfs  ${rate(sizeBytes, shmWriteMs)}  (same data, repository in memory: the pipeline without the disk limit; this disk writes ${diskRate} with fsync)`,
      `restore read    ${rate(readBytes, readMs)}  (${(readMs / 1000).toFixed(1)} s)`,
      `check --read-data ${rate(check.bytesVerified, check.durationMs)} of stored data (${(check.durationMs / 1000).toFixed(1)} s, ${check.chunksVerified} chunks)`,
      `gc              ${rate(gc.bytesBefore, gc.durationMs)} of packs (${(gc.durationMs / 1000).toFixed(1)} s; ${gc.packsDeleted} deleted, ${gc.packsRepacked} repacked, ${(gc.bytesBefore / MiB).toFixed(0)} -> ${(gc.bytesAfter / MiB).toFixed(0)} MiB)`,
      `peak RSS        ${rssPeakMiB.toFixed(0)} MiB (running peak after ${Object.entries(rssAfter).map(([k, v]) => `${k} ${v.toFixed(0)}`).join(', ')} MiB)`,
      `index           ${indexBytesPerChunk.toFixed(1)} bytes per chunk in memory (${repository.index.size} chunks)`,
      `zero            ${((s.zeroBytes / s.bytesIn) * 100).toFixed(1)}% of the data`,
      `dedup ratio     ${((s.bytesIn - s.zeroBytes) / unique).toFixed(2)}x (non-zero bytes / unique bytes)`,
      `compression     ${(s.compressedInBytes / s.compressedOutBytes).toFixed(2)}x (unique bytes / stored bytes)`,
      `total reduction ${(s.bytesIn / s.storedBytes).toFixed(2)}x (${(s.bytesIn / MiB).toFixed(0)} MiB -> ${(s.storedBytes / MiB).toFixed(0)} MiB)`,
      `restic 0.14     ${rate(sizeBytes, resticMs)} backup (${(resticMs / 1000).toFixed(1)} s), repository ${(Number(resticBytes) / MiB).toFixed(0)} MiB`,
      `snapshift/restic write throughput ratio ${(resticMs / writeMs).toFixed(2)}x`,
    ];
    process.stdout.write(`${lines.join('\n')}\n`);
  } finally {
    if (!args.includes('--keep')) await rm(root, { recursive: true, force: true });
    else process.stdout.write(`left ${root}\n`);
  }
}
