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
 * filesystems' mounts (deepest first), the loop devices reading the nbdfuse files, the nbdfuse mounts (nbdfuse
 * exits once unmounted), then any nbdfuse still running (by its recorded PID, only while its command line
 * still names this folder), and last the folder itself. Mounts and loop devices are found from the kernel's
 * own tables by their paths under `folder`, so a piece started just before a kill, not yet in the state file,
 * is found too. A failing step does not stop the others.
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

  for (const mount of mounts.filter((entry) => entry.fsType.startsWith('fuse')).sort(byDepth)) {
    if (await attempt(`unmount ${mount.mountPoint}`, () => unmount(mount.mountPoint, 'FILES_CLEANUP_FAILED'))) report.unmounted.push(mount.mountPoint);
  }

  for (const nbdfuse of state?.nbdfuse ?? []) {
    if (nbdfuse.pid === null || !(await commandLineNames(nbdfuse.pid, folder))) continue;
    if (await attempt(`end nbdfuse (pid ${nbdfuse.pid})`, () => endProcess(nbdfuse.pid!, folder))) report.endedProcesses.push(nbdfuse.pid);
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
    return (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0').some((arg) => arg.startsWith(`${folder}/`));
  } catch {
    return false;
  }
}

/** nbdfuse exits by itself once its mount is gone; this waits for that, then SIGTERM, then SIGKILL. */
async function endProcess(pid: number, folder: string): Promise<void> {
  for (const [graceMs, signal] of [[3_000, 'SIGTERM'], [3_000, 'SIGKILL'], [10_000, undefined]] as const) {
    const deadline = Date.now() + graceMs;
    while (Date.now() < deadline) {
      if (!(await commandLineNames(pid, folder))) return;
      await sleep(50);
    }
    if (!signal) break;
    try {
      process.kill(pid, signal);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ESRCH') return;
      throw error;
    }
  }
  throw new Error(`nbdfuse (pid ${pid}) did not exit after SIGKILL`);
}
