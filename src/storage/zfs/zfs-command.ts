import { SnapshiftError, messageOf, type ErrorCode } from '../../core/errors.ts';
import { exec, type ExecResult } from '../../core/exec.ts';

/**
 * zfs and zpool talk to a daemon (zfs-fuse, or the kernel module). A wedged daemon must not wedge us: every
 * call has a deadline, and "daemon not running" becomes a message that says so.
 */
export const zfsCommandTimeoutMs = 30_000;

/** One dataset, snapshot or clone as `zfs list -H -o name,type,origin,mountpoint -t all` shows it. */
export interface ZfsDataset {
  name: string;
  type: string;
  /** The snapshot a clone was made from; undefined for anything else. */
  origin: string | undefined;
  /** Absolute path, or undefined for snapshots and for `none`/`legacy`. */
  mountpoint: string | undefined;
}

export async function zfs(args: readonly string[], options: { code?: ErrorCode; timeoutMs?: number } = {}): Promise<ExecResult> {
  return zfsTool('zfs', args, options);
}

export async function zpool(args: readonly string[], options: { code?: ErrorCode; timeoutMs?: number } = {}): Promise<ExecResult> {
  return zfsTool('zpool', args, options);
}

async function zfsTool(program: 'zfs' | 'zpool', args: readonly string[], options: { code?: ErrorCode; timeoutMs?: number }): Promise<ExecResult> {
  const timeoutMs = options.timeoutMs ?? zfsCommandTimeoutMs;
  try {
    return await exec(program, args, { timeoutMs, code: options.code ?? 'ZFS_COMMAND_FAILED' });
  } catch (error) {
    if (!(error instanceof SnapshiftError) || error.code === 'PROGRAM_MISSING') throw error;
    const cause = error.cause as { killed?: boolean } | undefined;
    if (cause?.killed) {
      throw new SnapshiftError('ZFS_NOT_ANSWERING', `${program} ${args.join(' ')} did not answer within ${timeoutMs} ms; is the ZFS daemon (zfs-fuse) wedged?`, { cause: error });
    }
    // zfs-fuse's tools print this when they cannot reach the daemon's socket.
    if (/failed to initialize ZFS library/.test(error.message)) {
      throw new SnapshiftError('ZFS_NOT_RUNNING', `${program} ${args.join(' ')} failed: the ZFS daemon is not running (start zfs-fuse, or "snapshift lab zfs up" for the lab)`, { cause: error });
    }
    throw error;
  }
}

/** True when the ZFS daemon answers within `timeoutMs`. */
export async function zfsAnswers(timeoutMs = 5_000): Promise<boolean> {
  try {
    await zpool(['list', '-H', '-o', 'name'], { timeoutMs });
    return true;
  } catch {
    return false;
  }
}

/** Every dataset, snapshot and clone the daemon knows (old zfs-fuse has no `-p`; we need no sizes). */
export async function listZfsDatasets(): Promise<ZfsDataset[]> {
  const { stdout } = await zfs(['list', '-H', '-o', 'name,type,origin,mountpoint', '-t', 'all']);
  return stdout
    .split('\n')
    .filter((line) => line.trim() !== '')
    .map((line) => {
      const [name = '', type = '', origin = '-', mountpoint = '-'] = line.split('\t');
      return { name, type, origin: origin === '-' ? undefined : origin, mountpoint: mountpoint.startsWith('/') ? mountpoint : undefined };
    });
}

/**
 * `zfs destroy NAME`, retried while the dataset is busy: zfs-fuse keeps a clone busy for a moment after its
 * last reader closed it (measured: the first try right after qemu-img fails, the second 200 ms later works).
 * A dataset that no longer exists counts as destroyed, so removal can be repeated.
 */
export async function destroyWhileBusy(name: string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      await zfs(['destroy', name], { code: 'STORAGE_SNAPSHOT_REMOVE_FAILED' });
      return;
    } catch (error) {
      const message = messageOf(error);
      if (/does not exist|could not find any snapshots to destroy/.test(message)) return;
      if (!/busy/.test(message) || Date.now() >= deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
}
