import { readFile, rm } from 'node:fs/promises';
import { messageOf } from '../../core/errors.ts';
import { detachLoop, readLoopDevices, readMounts, sleep, unmount } from './host-pieces.ts';
import type { FileRestoreRunState } from './run-state.ts';

/** What undoing a run folder's pieces did (or, in a dry run, would do). */
export interface TearDownReport {
  folder: string;
  unmounted: string[];
  detachedLoops: string[];
  endedProcesses: number[];
  removedFolder: boolean;
  /** What could not be undone, each with the reason; the folder then stays for the next try. */
  problems: string[];
}

/**
 * Undoes everything a `files` run started under `folder`, in the order that lets each piece go: the guest
 * filesystems' mounts (deepest first), the loop devices reading the disk files, the disk readers (by their
 * recorded PIDs, only while their command lines still name this folder: SIGTERM, which unmounts their FUSE
 * export, then SIGKILL), any FUSE mount a killed reader left, and last the folder with its overlays. Mounts and
 * loop devices are found from the kernel's own tables by their paths under `folder`, so a piece started just
 * before a kill, not yet in the state file, is found too. A failing step does not stop the others.
 */
export async function tearDownRunFolder(folder: string, state: FileRestoreRunState | undefined, options: { dryRun?: boolean; removeFolder?: boolean } = {}): Promise<TearDownReport> {
  const report: TearDownReport = { folder, unmounted: [], detachedLoops: [], endedProcesses: [], removedFolder: false, problems: [] };
  const inside = (path: string) => path.startsWith(`${folder}/`);
  const attempt = async (what: string, step: () => Promise<void>): Promise<boolean> => {
    if (options.dryRun) return true;
    try {
      await step();
      return true;
    } catch (error) {
      report.problems.push(`${what}: ${messageOf(error)}`);
      return false;
    }
  };

  const mounts = (await readMounts()).filter((mount) => inside(mount.mountPoint));
  const byDepth = (a: { mountPoint: string }, b: { mountPoint: string }) => b.mountPoint.split('/').length - a.mountPoint.split('/').length;
  for (const mount of mounts.filter((entry) => !entry.fsType.startsWith('fuse')).sort(byDepth)) {
    if (await attempt(`unmount ${mount.mountPoint}`, () => unmount(mount.mountPoint, 'FILES_CLEANUP_FAILED'))) report.unmounted.push(mount.mountPoint);
  }

  const loops = (await readLoopDevices()).filter((loop) => inside(loop.backingFile));
  for (const loop of loops) {
    if (await attempt(`detach ${loop.device}`, () => detachLoop(loop.device, 'FILES_CLEANUP_FAILED'))) report.detachedLoops.push(loop.device);
  }

  for (const reader of state?.readers ?? []) {
    if (reader.pid === null || !(await commandLineNames(reader.pid, folder))) continue;
    if (await attempt(`end the disk reader (pid ${reader.pid})`, () => endProcess(reader.pid!, folder))) report.endedProcesses.push(reader.pid);
  }

  // A reader ended by SIGTERM unmounts its own export; a killed one leaves it (reads fail with ENOTCONN).
  const fuseMounts = options.dryRun ? mounts.filter((entry) => entry.fsType.startsWith('fuse')) : (await readMounts()).filter((mount) => inside(mount.mountPoint) && mount.fsType.startsWith('fuse'));
  for (const mount of fuseMounts.sort(byDepth)) {
    if (await attempt(`unmount ${mount.mountPoint}`, () => unmount(mount.mountPoint, 'FILES_CLEANUP_FAILED'))) report.unmounted.push(mount.mountPoint);
  }

  if (options.removeFolder !== false && !options.dryRun) {
    const stillMounted = (await readMounts()).filter((mount) => inside(mount.mountPoint) || mount.mountPoint === folder);
    if (stillMounted.length > 0) {
      report.problems.push(`remove ${folder}: ${stillMounted.map((mount) => mount.mountPoint).join(', ')} still mounted`);
    } else if (await attempt(`remove ${folder}`, () => rm(folder, { recursive: true, force: true }))) {
      report.removedFolder = true;
    }
  } else if (options.dryRun) {
    report.removedFolder = options.removeFolder !== false;
  }
  return report;
}

/** True while `pid` runs a command whose arguments name something under `folder` (a recycled PID does not). */
async function commandLineNames(pid: number, folder: string): Promise<boolean> {
  try {
    return (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0').some((arg) => arg.includes(`${folder}/`));
  } catch {
    return false;
  }
}

/** SIGTERM (qemu-storage-daemon unmounts its export and exits), then SIGKILL; waits for the process to go. */
async function endProcess(pid: number, folder: string): Promise<void> {
  for (const [signal, graceMs] of [['SIGTERM', 5_000], ['SIGKILL', 10_000]] as const) {
    try {
      process.kill(pid, signal);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ESRCH') return;
      throw error;
    }
    const deadline = Date.now() + graceMs;
    while (Date.now() < deadline) {
      if (!(await commandLineNames(pid, folder))) return;
      await sleep(50);
    }
  }
  throw new Error(`process ${pid} did not exit after SIGKILL`);
}
