import { randomBytes } from 'node:crypto';
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';

/** Run folders of `files` commands are `<home>/run/files-<pid>-<hex>`; nothing else there is ours to touch. */
export const runFolderPrefix = 'files-';
export const stateFileName = 'state.json';

/**
 * What one `files` run started, written before each piece is started (or, for a loop device whose name the
 * kernel picks, right after), so that a run killed at any point can be undone by the next one.
 */
export interface FileRestoreRunState {
  version: 1;
  pid: number;
  /** Field 22 of /proc/<pid>/stat: with the PID, tells our process from a later one that got its PID. */
  processStartTicks: string;
  vm: string;
  restorePoint: string;
  startedAt: string;
  /** One qemu-storage-daemon per disk, presenting it as the file `diskFile` (a FUSE mount over a regular file). */
  readers: Array<{ disk: string; diskFile: string; pid: number | null }>;
  loops: Array<{ volume: string; device: string }>;
  mounts: Array<{ volume: string; mountPoint: string }>;
}

/** A run folder of this process, with its state file; `save` rewrites the file atomically. */
export class RunFolder {
  private constructor(
    readonly path: string,
    readonly state: FileRestoreRunState,
  ) {}

  static async create(runRoot: string, vm: string, restorePoint: string): Promise<RunFolder> {
    await mkdir(runRoot, { recursive: true, mode: 0o700 });
    const path = join(runRoot, `${runFolderPrefix}${process.pid}-${randomBytes(3).toString('hex')}`);
    await mkdir(path, { mode: 0o700 });
    const folder = new RunFolder(path, {
      version: 1,
      pid: process.pid,
      processStartTicks: processStartTicks(process.pid) ?? '',
      vm,
      restorePoint,
      startedAt: new Date().toISOString(),
      readers: [],
      loops: [],
      mounts: [],
    });
    await folder.save();
    return folder;
  }

  async save(): Promise<void> {
    const file = join(this.path, stateFileName);
    await writeFile(`${file}.tmp`, `${JSON.stringify(this.state, null, 2)}\n`, { mode: 0o600 });
    await rename(`${file}.tmp`, file);
  }
}

/** The state file of a run folder, or undefined when it is missing or unreadable (a run killed before it wrote it). */
export async function readRunState(folder: string): Promise<FileRestoreRunState | undefined> {
  try {
    const parsed: unknown = JSON.parse(await readFile(join(folder, stateFileName), 'utf8'));
    if (!isRunState(parsed)) return undefined;
    return parsed;
  } catch {
    return undefined;
  }
}

function isRunState(value: unknown): value is FileRestoreRunState {
  if (typeof value !== 'object' || value === null) return false;
  const state = value as Partial<FileRestoreRunState>;
  return (
    state.version === 1 &&
    Number.isSafeInteger(state.pid) &&
    typeof state.processStartTicks === 'string' &&
    Array.isArray(state.readers) &&
    state.readers.every((entry) => typeof entry?.diskFile === 'string' && (entry.pid === null || Number.isSafeInteger(entry.pid))) &&
    Array.isArray(state.loops) &&
    state.loops.every((entry) => typeof entry?.device === 'string') &&
    Array.isArray(state.mounts) &&
    state.mounts.every((entry) => typeof entry?.mountPoint === 'string')
  );
}

/** Field 22 (starttime) of /proc/<pid>/stat, or undefined when the process is gone. */
export function processStartTicks(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may hold spaces and parentheses: count fields after its last ")".
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

/** The PID of a run folder's name (`files-<pid>-<hex>`), for folders whose state file was never written. */
export function pidOfRunFolder(name: string): number | undefined {
  const match = /^files-(\d+)-[0-9a-f]+$/.exec(name);
  return match ? Number(match[1]) : undefined;
}
