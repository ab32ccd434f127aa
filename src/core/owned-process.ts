import { promises as fs } from 'node:fs';

/** A process we started, recorded so it can be found again: its PID and the argv it was started with. */
export interface OwnedProcess {
  /** Who owns it, e.g. "vm:web1". */
  label: string;
  pid: number;
  cmdline: string[];
}

/** The argv of a live process, or undefined if it is gone or a zombie (a zombie's cmdline is empty). */
export async function readCmdline(pid: number): Promise<string[] | undefined> {
  try {
    const raw = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8');
    if (raw === '') return undefined;
    return raw.replace(/\0$/, '').split('\0');
  } catch {
    return undefined;
  }
}

/**
 * True when the recorded process still runs as what we started. PIDs are reused, so a PID alone is never
 * enough to kill: the whole command line must match the one recorded when we started it.
 */
export async function isOwnedProcessAlive(record: OwnedProcess): Promise<boolean> {
  const cmdline = await readCmdline(record.pid);
  return cmdline !== undefined && cmdline.length === record.cmdline.length && cmdline.every((arg, i) => arg === record.cmdline[i]);
}

/** Waits until the process is gone (or a zombie); false on timeout. */
export async function waitForExit(pid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if ((await readCmdline(pid)) === undefined) return true;
    if (Date.now() >= deadline) return false;
    await sleep(50);
  }
}

/**
 * Ends a recorded process: SIGTERM, then SIGKILL after `graceMs`. Does nothing if the PID now belongs to
 * someone else or is gone. Returns whether it had to kill anything.
 */
export async function endOwnedProcess(record: OwnedProcess, options: { graceMs?: number; signal?: NodeJS.Signals } = {}): Promise<boolean> {
  if (!(await isOwnedProcessAlive(record))) return false;
  signal(record.pid, options.signal ?? 'SIGTERM');
  if (await waitForExit(record.pid, options.graceMs ?? 3000)) return true;
  if (await isOwnedProcessAlive(record)) signal(record.pid, 'SIGKILL');
  if (!(await waitForExit(record.pid, 10_000))) throw new Error(`process ${record.pid} (${record.label}) did not exit after SIGKILL`);
  return true;
}

function signal(pid: number, name: NodeJS.Signals): void {
  try {
    process.kill(pid, name);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ESRCH') throw error;
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
