import { open, rm, rename } from 'node:fs/promises';
import { SnapshiftError } from '../core/errors.ts';
import { exec } from '../core/exec.ts';
import type { RestorePointReader } from '../repository/index.ts';
import { pathExists } from '../core/fs-probe.ts';

export type RestoreFormat = 'raw' | 'qcow2';

export interface DiskRestoreOptions {
  format: RestoreFormat;
  force: boolean;
  chunkSizeBytes: number;
  /** Chunk reads in flight. */
  readAhead?: number;
  onProgress?: (doneBytes: number, totalBytes: number) => void;
}

/**
 * Writes one disk of a restore point to `targetPath`: zero chunks are never written, so a raw file stays
 * sparse; qcow2 is converted from that sparse raw file by qemu-img. The target appears only when complete
 * (temp name, then rename), so a failed restore never leaves a half-written disk under the asked name.
 */
export async function restoreDisk(reader: RestorePointReader, diskName: string, targetPath: string, options: DiskRestoreOptions): Promise<{ sizeBytes: number; writtenBytes: number }> {
  const disk = reader.summary.disks.find((candidate) => candidate.name === diskName);
  if (!disk) {
    throw new SnapshiftError('RESTORE_NO_SUCH_DISK', `restore point ${reader.summary.id} has no disk "${diskName}" (it has: ${reader.summary.disks.map((d) => d.name).join(', ')})`);
  }
  if (!options.force && (await pathExists(targetPath))) {
    throw new SnapshiftError('RESTORE_TARGET_EXISTS', `${targetPath} exists: choose another path or pass --force to overwrite it`);
  }
  const rawPath = `${targetPath}.snapshift-partial${options.format === 'qcow2' ? '.raw' : ''}`;
  let writtenBytes = 0;
  try {
    const file = await open(rawPath, 'w');
    try {
      await file.truncate(disk.sizeBytes);
      const chunkCount = Math.ceil(disk.sizeBytes / options.chunkSizeBytes);
      const readAhead = Math.max(1, options.readAhead ?? 8);
      const pending: Array<Promise<{ offset: number; data: Buffer } | undefined>> = [];
      const startRead = (index: number) => {
        if (reader.chunkIsZero(diskName, index)) return Promise.resolve(undefined);
        const offset = index * options.chunkSizeBytes;
        const length = Math.min(options.chunkSizeBytes, disk.sizeBytes - offset);
        return reader.read(diskName, offset, length).then((data) => ({ offset, data }));
      };
      let next = 0;
      for (let index = 0; index < chunkCount; index++) {
        while (next < chunkCount && next < index + readAhead) {
          const read = startRead(next++);
          read.catch(() => undefined);
          pending.push(read);
        }
        const chunk = await pending.shift()!;
        if (chunk) {
          await file.write(chunk.data, 0, chunk.data.length, chunk.offset);
          writtenBytes += chunk.data.length;
        }
        options.onProgress?.(Math.min(disk.sizeBytes, (index + 1) * options.chunkSizeBytes), disk.sizeBytes);
      }
      await file.sync();
    } finally {
      await file.close();
    }
    if (options.format === 'qcow2') {
      const qcow2Partial = `${targetPath}.snapshift-partial`;
      await exec('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', rawPath, qcow2Partial], { timeoutMs: 3_600_000 });
      await rm(rawPath, { force: true });
      await rename(qcow2Partial, targetPath);
    } else {
      await rename(rawPath, targetPath);
    }
  } catch (error) {
    await rm(rawPath, { force: true });
    await rm(`${targetPath}.snapshift-partial`, { force: true });
    throw error;
  }
  return { sizeBytes: disk.sizeBytes, writtenBytes };
}
