/**
 * NBD read throughput of our client against nbdcopy, same qemu-storage-daemon, same unix socket, same run.
 *   node --import tsx bench/nbd-read-throughput.ts [--size-mib 1024] [--request-mib 1] [--depth 16] [--rounds 2]
 * Prints one JSON document. The product target is ours >= 0.7x nbdcopy.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { exec } from '../src/core/exec.ts';
import { NbdClient } from '../src/datamover/nbd/index.ts';
import { StorageDaemon } from '../src/lab/storage-daemon.ts';

const { values } = parseArgs({
  options: {
    'size-mib': { type: 'string', default: '1024' },
    'request-mib': { type: 'string', default: '1' },
    depth: { type: 'string', default: '16' },
    rounds: { type: 'string', default: '3' },
  },
});
const sizeMiB = Number(values['size-mib']);
const requestBytes = Number(values['request-mib']) * 1024 * 1024;
const depth = Number(values.depth);
const rounds = Number(values.rounds);

const dir = await mkdtemp(join(tmpdir(), 'snapshift-nbd-bench-'));
try {
  const raw = join(dir, 'random.raw');
  const image = join(dir, 'disk.qcow2');
  // Random data so no layer can shortcut zeros; every cluster allocated.
  await exec('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', `count=${sizeMiB}`, 'status=none']);
  await exec('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, image]);
  await rm(raw);
  await using daemon = await StorageDaemon.start({ dir, images: [{ path: image, format: 'qcow2' }] });
  const uri = `nbd+unix:///disk0?socket=${daemon.nbdSocketPath}`;

  // Warm qemu-storage-daemon up first (qcow2 metadata caches, allocator): the first pass is always slow.
  await exec('nbdcopy', [uri, 'null:']);
  const ours: number[] = [];
  const nbdcopy: number[] = [];
  for (let round = 0; round < rounds; round++) {
    ours.push(await readAllWithOurClient(daemon.nbdSocketPath));
    const started = performance.now();
    await exec('nbdcopy', [uri, 'null:']);
    nbdcopy.push((sizeMiB * 1024 * 1024) / 1e6 / ((performance.now() - started) / 1000));
  }
  const best = (rates: number[]) => Math.round(Math.max(...rates));
  console.log(
    JSON.stringify({
      sizeMiB,
      requestMiB: requestBytes / 1024 / 1024,
      depth,
      oursMBps: ours.map(Math.round),
      nbdcopyMBps: nbdcopy.map(Math.round),
      oursMedianMBps: median(ours),
      nbdcopyMedianMBps: median(nbdcopy),
      ratioMedian: Number((median(ours) / median(nbdcopy)).toFixed(2)),
      ratioBest: Number((best(ours) / best(nbdcopy)).toFixed(2)),
      peakRssMiB: Math.round(process.resourceUsage().maxRSS / 1024),
    }),
  );
} finally {
  await rm(dir, { recursive: true, force: true });
}

function median(rates: number[]): number {
  const sorted = [...rates].sort((a, b) => a - b);
  return Math.round(sorted[Math.floor(sorted.length / 2)]!);
}

async function readAllWithOurClient(socketPath: string): Promise<number> {
  await using nbd = await NbdClient.connect({ socketPath, exportName: 'disk0', metaContexts: ['base:allocation'] });
  const started = performance.now();
  const requests: Array<{ offset: number; length: number }> = [];
  for await (const extent of nbd.extents('base:allocation')) {
    if ((extent.flags & 2) !== 0) continue; // reads as zeros: nothing to fetch
    for (let at = extent.offset; at < extent.offset + extent.length; at += requestBytes) {
      requests.push({ offset: at, length: Math.min(requestBytes, extent.offset + extent.length - at) });
    }
  }
  let next = 0;
  let bytes = 0;
  // One reused buffer per lane, as the backup pipeline does.
  await Promise.all(
    Array.from({ length: depth }, async () => {
      const buffer = Buffer.allocUnsafe(requestBytes);
      while (next < requests.length) {
        const request = requests[next++]!;
        await nbd.readInto(request.offset, buffer.subarray(0, request.length));
        bytes += request.length;
      }
    }),
  );
  return bytes / 1e6 / ((performance.now() - started) / 1000);
}
