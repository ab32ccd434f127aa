import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { processIsAlive } from '../../core/process-alive.ts';
import { pidOfRunFolder, processStartTicks, readRunState, runFolderPrefix } from './run-state.ts';
import { tearDownRunFolder, type TearDownReport } from './tear-down.ts';

/**
 * Removes what killed `files` runs left under `runRoot` (`<home>/run`): for every `files-*` folder whose
 * process is gone (or whose PID now belongs to a later process), its mounts, loop devices, disk readers and the
 * folder. A live run's folder is never touched. Every `files` command and `snapshift hunt` call this first.
 */
export async function removeFileRestoreLeftovers(runRoot: string, options: { dryRun?: boolean } = {}): Promise<TearDownReport[]> {
  let names: string[];
  try {
    names = (await readdir(runRoot)).filter((name) => name.startsWith(runFolderPrefix));
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw error;
  }
  const reports: TearDownReport[] = [];
  for (const name of names.sort()) {
    const folder = join(runRoot, name);
    const state = await readRunState(folder);
    const pid = state?.pid ?? pidOfRunFolder(name);
    if (pid === undefined) continue; // not named as ours: leave it
    if (pid === process.pid) continue;
    const alive = processIsAlive(pid) && (state === undefined || state.processStartTicks === '' || processStartTicks(pid) === state.processStartTicks);
    if (alive) continue;
    reports.push(await tearDownRunFolder(folder, state, options));
  }
  return reports;
}

/** One line per piece a report undid, for people. */
export function describeTearDown(report: TearDownReport, dryRun = false): string[] {
  const verb = (done: string, would: string) => (dryRun ? `would ${would}` : done);
  return [
    ...report.unmounted.map((path) => `${verb('unmounted', 'unmount')} ${path}`),
    ...report.detachedLoops.map((device) => `${verb('detached', 'detach')} loop device ${device}`),
    ...report.endedProcesses.map((pid) => `${verb('ended', 'end')} disk reader qemu-storage-daemon (pid ${pid})`),
    ...(report.removedFolder ? [`${verb('removed', 'remove')} ${report.folder}`] : []),
    ...report.problems.map((problem) => `could not ${problem}`),
  ];
}
