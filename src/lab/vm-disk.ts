import { createWriteStream, promises as fs } from 'node:fs';
import { randomFillSync } from 'node:crypto';
import path from 'node:path';
import { once } from 'node:events';
import { exec } from '../core/exec.ts';

/**
 * Makes a qcow2 disk of `sizeBytes` whose first `fillBytes` are random (incompressible, like real data)
 * and the rest unallocated. The random seed is written as raw to `scratchDir` (off the datastore), so only
 * the qcow2 itself is written to the datastore under test.
 */
export async function createVmDisk(diskPath: string, sizeBytes: number, fillBytes: number, scratchDir: string): Promise<void> {
  await fs.mkdir(scratchDir, { recursive: true });
  const seed = path.join(scratchDir, `seed-${process.pid}-${path.basename(diskPath)}.raw`);
  try {
    const out = createWriteStream(seed);
    const blockBytes = 4 * 1024 * 1024;
    for (let written = 0; written < fillBytes; written += blockBytes) {
      // a fresh buffer each time: the stream may still hold the previous one, and reuse would duplicate blocks
      const chunk = randomFillSync(Buffer.allocUnsafe(Math.min(blockBytes, fillBytes - written)));
      if (!out.write(chunk)) await once(out, 'drain');
    }
    out.end();
    await once(out, 'finish');
    await fs.truncate(seed, sizeBytes);
    await exec('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', seed, diskPath], { timeoutMs: 600_000 });
  } finally {
    await fs.rm(seed, { force: true });
  }
}
