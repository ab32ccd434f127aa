// The guest's write latency as QEMU's block layer sees it: a latency histogram on the guest's disk device
// (QMP block-latency-histogram-set / query-blockstats). It measures every write the guest issues, including
// what a VM-snapshot overlay or a copy-before-write filter adds under it, with no change to the guest.
import { connectQmp } from '../src/hypervisor/qemu/qmp-connect.ts';

/** Bin edges in nanoseconds: 50 µs to 5 s, about 8 per decade. */
const boundariesNs = Array.from({ length: 41 }, (_, index) => Math.round(50_000 * 10 ** (index / 8)));

interface BlockStats {
  qdev?: string;
  device?: string;
  stats: { wr_latency_histogram?: { boundaries: number[]; bins: number[] } };
}

/** Starts a fresh histogram on the device (setting it again clears it). QEMU serves one QMP client: call between tasks. */
export async function startWriteLatencyHistogram(qmpSocketPath: string, deviceId: string): Promise<void> {
  await using qmp = await connectQmp('bench', qmpSocketPath, 10_000);
  await qmp.execute('block-latency-histogram-set', { id: deviceId, 'boundaries-write': boundariesNs });
}

export interface WriteLatency {
  writes: number;
  p50Ms: number;
  p99Ms: number;
}

/** The writes counted since `startWriteLatencyHistogram`, as percentiles (each the upper edge of its bin). */
export async function readWriteLatency(qmpSocketPath: string, deviceId: string): Promise<WriteLatency> {
  await using qmp = await connectQmp('bench', qmpSocketPath, 10_000);
  const devices = await qmp.execute<BlockStats[]>('query-blockstats');
  const histogram = devices.find((device) => device.qdev === deviceId || device.device === deviceId)?.stats.wr_latency_histogram;
  if (!histogram) throw new Error(`no write latency histogram on device ${deviceId}`);
  const writes = histogram.bins.reduce((total, count) => total + count, 0);
  const percentile = (share: number): number => {
    let seen = 0;
    for (const [index, count] of histogram.bins.entries()) {
      seen += count;
      if (seen >= share * writes) return (histogram.boundaries[index] ?? histogram.boundaries.at(-1)! * 10) / 1e6;
    }
    return 0;
  };
  return { writes, p50Ms: percentile(0.5), p99Ms: percentile(0.99) };
}
