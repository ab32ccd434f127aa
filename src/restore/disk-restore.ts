import { execFile } from 'node:child_process';
import { open, rm, rename } from 'node:fs/promises';
import { SnapshiftError, messageOf } from '../core/errors.ts';
import { childEnv } from '../core/exec.ts';
import { faultPoint } from '../core/fault-points.ts';
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
  /** Stops the restore: the partial file is removed and the promise rejects with RESTORE_STOPPED. */
  signal?: AbortSignal;
  /** Hears non-fatal problems, e.g. a read-only repository read without a lock. */
  onWarning?: (message: string) => void;
}

/**
 * Writes one disk of a restore point to `targetPath`: zero chunks are never written, so a raw file stays
 * sparse; qcow2 is converted from that sparse raw file by qemu-img. The target appears only when complete
 * (temp name, then rename), so a failed or stopped restore never leaves a half-written disk under the asked
 * name. A shared repository lock is held while it reads (docs/FORMAT.md § Locks), so gc cannot delete packs
 * under it. A SIGKILL leaves `<target>.snapshift-partial` (and `.raw`), which the next restore to the same
 * target replaces.
 */
export async function restoreDisk(reader: RestorePointReader, diskName: string, targetPath: string, options: DiskRestoreOptions): Promise<{ sizeBytes: number; writtenBytes: number }> {
  const disk = reader.summary.disks.find((candidate) => candidate.name === diskName);
  if (!disk) {
    throw new SnapshiftError('RESTORE_NO_SUCH_DISK', `restore point ${reader.summary.id} has no disk "${diskName}" (it has: ${reader.summary.disks.map((d) => d.name).join(', ')})`);
  }
  if (!options.force && (await pathExists(targetPath))) {
    throw new SnapshiftError('RESTORE_TARGET_EXISTS', `${targetPath} exists: choose another path or pass --force to overwrite it`);
  }
  const repository = reader.repository;
  await using _lock = await repository.lockForReading(`restore of ${reader.summary.vmName}`, options.onWarning);
  // Opened before the lock was: it may have been forgotten (and its data collected) in between.
  if (!(await repository.hasRestorePoint(reader.summary.id))) {
    throw new SnapshiftError('REPO_RESTORE_POINT_NOT_FOUND', `restore point ${reader.summary.id} was forgotten while the restore started; nothing was written`);
  }
  const signal = options.signal;
  const stopped = (): SnapshiftError =>
    new SnapshiftError('RESTORE_STOPPED', `restore of disk ${diskName} to ${targetPath} stopped${signal?.reason === undefined ? '' : ` (${messageOf(signal.reason)})`}; the partial file was removed`);
  const rawPath = `${targetPath}.snapshift-partial${options.format === 'qcow2' ? '.raw' : ''}`;
  let writtenBytes = 0;
  try {
    if (signal?.aborted) throw stopped();
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
        if (signal?.aborted) throw stopped();
        if (chunk) {
          await file.write(chunk.data, 0, chunk.data.length, chunk.offset);
          writtenBytes += chunk.data.length;
          faultPoint('restore.mid-copy');
        }
        options.onProgress?.(Math.min(disk.sizeBytes, (index + 1) * options.chunkSizeBytes), disk.sizeBytes);
      }
      await file.sync();
    } finally {
      await file.close();
    }
    if (options.format === 'qcow2') {
      const qcow2Partial = `${targetPath}.snapshift-partial`;
      await convertToQcow2(rawPath, qcow2Partial, signal).catch((error: unknown) => {
        throw signal?.aborted ? stopped() : error;
      });
      await rm(rawPath, { force: true });
      if (signal?.aborted) throw stopped();
      faultPoint('restore.before-rename');
      await rename(qcow2Partial, targetPath);
    } else {
      if (signal?.aborted) throw stopped();
      faultPoint('restore.before-rename');
      await rename(rawPath, targetPath);
    }
  } catch (error) {
    await rm(rawPath, { force: true });
    await rm(`${targetPath}.snapshift-partial`, { force: true });
    throw error;
  }
  return { sizeBytes: disk.sizeBytes, writtenBytes };
}

/** qemu-img convert, ended (SIGTERM to its PID) when `signal` aborts; a failure names qemu-img's last line. */
function convertToQcow2(rawPath: string, qcow2Path: string, signal: AbortSignal | undefined): Promise<void> {
  const args = ['convert', '-q', '-f', 'raw', '-O', 'qcow2', rawPath, qcow2Path];
  return new Promise((resolve, reject) => {
    execFile('qemu-img', args, { timeout: 3_600_000, maxBuffer: 16 * 1024 * 1024, encoding: 'utf8', signal, env: childEnv() }, (error, _stdout, stderr) => {
      if (!error) return resolve();
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return reject(new SnapshiftError('PROGRAM_MISSING', 'qemu-img is not installed (needed for --format qcow2; run "bash scripts/setup.sh")', { cause: error }));
      const detail = stderr.trim().split('\n').at(-1)?.trim() || error.message;
      reject(new SnapshiftError('COMMAND_FAILED', `qemu-img ${args.join(' ')} failed: ${detail}`, { cause: error }));
    });
  });
}
