import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { SnapshiftError, messageOf } from '../core/errors.ts';
import { exec } from '../core/exec.ts';
import { zfs, zfsAnswers, zpool } from '../storage/zfs/zfs-command.ts';
import { listMounts } from './host-inventory.ts';
import { onPath } from './lab-preflight.ts';
import type { ProcessRecord } from './lab-state.ts';
import { endOwnedProcess, isOwnedProcessAlive, readCmdline, sleep } from './owned-process.ts';

/**
 * The lab's ZFS datastore as recorded: a pool on a sparse file, with one dataset for VM disks. Written before
 * the pool is made, so a crash half-way still leaves down everything it needs.
 */
export interface ZfsRecord {
  /** Unique per lab (`snapshift-lab-<8 hex>`), so two labs on one machine never touch each other's pool. */
  poolName: string;
  imagePath: string;
  sizeBytes: number;
  /** The pool's root mountpoint; the VM disk dataset is mounted at `<mountPoint>/vms`. */
  mountPoint: string;
  /** `<pool>/vms`: the volume a ZFS storage snapshot takes. */
  dataset: string;
}

/** Label of the zfs-fuse daemon in the lab's processes, present only when this lab started it. */
export const zfsDaemonLabel = 'zfs-fuse';
/** zfs-fuse in the foreground (`-n`), so the PID we spawn is the daemon's PID; no /zfs-kstat mount. */
const zfsDaemonArgs = ['-n', '--no-kstat-mount'] as const;
/** zpool refuses files under 64 MiB. */
export const minZfsPoolSizeBytes = 128 * 1024 ** 2;

/** What `zfsUp` needs on the host, named with the package that brings it. */
export async function checkZfsHost(): Promise<void> {
  const missing: string[] = [];
  if (process.getuid?.() !== 0) missing.push('root');
  for (const program of ['zfs-fuse', 'zpool', 'zfs']) if (!(await onPath(program))) missing.push(`${program} (apt-get install zfs-fuse)`);
  if (!(await fs.access('/dev/fuse').then(() => true, () => false))) missing.push('/dev/fuse (load the fuse module)');
  if (missing.length > 0) throw new SnapshiftError('LAB_HOST_UNFIT', `cannot bring the lab's ZFS datastore up, missing: ${missing.join(', ')}`);
}

export function newZfsRecord(imagePath: string, mountPoint: string, sizeBytes: number): ZfsRecord {
  const poolName = `snapshift-lab-${randomBytes(4).toString('hex')}`;
  return { poolName, imagePath, sizeBytes, mountPoint, dataset: `${poolName}/vms` };
}

/**
 * zfs-fuse is one daemon per machine. If one answers already (someone else's, or another lab's), it is used
 * and nothing is returned: it is not ours to end. Otherwise we start one; `record` persists it before we wait.
 */
export async function ensureZfsDaemon(record: (process: ProcessRecord) => Promise<void>, readyTimeoutMs = 15_000): Promise<ProcessRecord | undefined> {
  if (await zfsAnswers()) return undefined;
  const child = spawn('zfs-fuse', zfsDaemonArgs, { detached: true, stdio: 'ignore', cwd: '/' });
  const pid = await new Promise<number>((resolve, reject) => {
    child.once('spawn', () => resolve(child.pid!));
    child.once('error', reject);
  });
  child.unref();
  const daemon: ProcessRecord = { label: zfsDaemonLabel, pid, cmdline: (await readCmdline(pid)) ?? ['zfs-fuse', ...zfsDaemonArgs], startedAt: new Date().toISOString() };
  await record(daemon);
  const deadline = Date.now() + readyTimeoutMs;
  for (;;) {
    if (await zfsAnswers(2_000)) return daemon;
    if (!(await isOwnedProcessAlive(daemon))) throw new SnapshiftError('LAB_ZFS_FAILED', `zfs-fuse (pid ${pid}) exited at start; is another ZFS daemon holding /var/run/zfs/zfs_socket?`);
    if (Date.now() >= deadline) throw new SnapshiftError('LAB_ZFS_FAILED', `zfs-fuse (pid ${pid}) did not answer within ${readyTimeoutMs} ms`);
    await sleep(100);
  }
}

/** Sparse file → pool (never in a cache file, so no daemon ever imports it on its own) → VM disk dataset. */
export async function createZfsPool(zfsRecord: ZfsRecord): Promise<void> {
  await fs.rm(zfsRecord.imagePath, { force: true });
  await (await fs.open(zfsRecord.imagePath, 'w')).close();
  await fs.truncate(zfsRecord.imagePath, zfsRecord.sizeBytes);
  await zpool(['create', '-o', 'cachefile=none', '-m', zfsRecord.mountPoint, zfsRecord.poolName, zfsRecord.imagePath], { code: 'LAB_ZFS_FAILED' });
  await zfs(['create', zfsRecord.dataset], { code: 'LAB_ZFS_FAILED' });
}

/** True when the recorded pool is imported by the running daemon. */
export async function zfsPoolImported(poolName: string): Promise<boolean> {
  try {
    await zpool(['list', '-H', '-o', 'name', poolName], { timeoutMs: 5_000 });
    return true;
  } catch {
    return false;
  }
}

/**
 * Destroys the recorded pool (retried while busy: zfs-fuse holds datasets a moment after their last user),
 * unmounts whatever FUSE mount of it a dead daemon left, deletes the pool file. Safe to repeat.
 */
export async function removeZfsPool(zfsRecord: ZfsRecord): Promise<void> {
  if (await zfsAnswers()) {
    const deadline = Date.now() + 15_000;
    while (await zfsPoolImported(zfsRecord.poolName)) {
      try {
        await zpool(['destroy', ...(Date.now() >= deadline ? ['-f'] : []), zfsRecord.poolName], { code: 'LAB_ZFS_FAILED' });
      } catch (error) {
        if (Date.now() >= deadline + 5_000) throw new SnapshiftError('LAB_ZFS_FAILED', `cannot destroy ZFS pool ${zfsRecord.poolName}: ${messageOf(error)}`, { cause: error });
        await sleep(200);
      }
    }
  }
  await unmountLeftovers(zfsRecord.mountPoint);
  await fs.rm(zfsRecord.imagePath, { force: true });
  await fs.rmdir(`${zfsRecord.mountPoint}/vms`).catch(() => undefined);
  await fs.rmdir(zfsRecord.mountPoint).catch(() => undefined);
}

/**
 * Ends the daemon this lab started, unless pools other than ours are still imported (another lab's or a
 * user's): then it keeps running and the caller forgets it. Returns what happened.
 */
export async function endZfsDaemon(daemon: ProcessRecord): Promise<'ended' | 'gone' | 'kept'> {
  if (!(await isOwnedProcessAlive(daemon))) return 'gone';
  const { stdout } = await zpool(['list', '-H', '-o', 'name'], { timeoutMs: 5_000 }).catch(() => ({ stdout: '' }));
  if (stdout.trim() !== '') return 'kept';
  // zfs-fuse unmounts its datasets on SIGTERM; give it time before SIGKILL.
  await endOwnedProcess(daemon, { graceMs: 10_000 });
  return 'ended';
}

/** FUSE mounts at or under `mountPoint` (a killed zfs-fuse leaves them dangling), deepest first. */
async function unmountLeftovers(mountPoint: string): Promise<void> {
  const leftovers = (await listMounts())
    .filter((entry) => entry.mountPoint === mountPoint || entry.mountPoint.startsWith(`${mountPoint}/`))
    .map((entry) => entry.mountPoint)
    .sort((a, b) => b.length - a.length);
  for (const target of leftovers) {
    await exec('umount', [target], { timeoutMs: 10_000 }).catch(() => exec('umount', ['-l', target], { timeoutMs: 10_000, code: 'LAB_UNMOUNT_FAILED' }));
  }
}
