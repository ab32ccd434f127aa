import { readFileSync } from 'node:fs';

/** True while a process with this PID exists (EPERM: it exists but is not ours to signal). */
export function processIsAlive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * True while `pid` is still one of our (node) processes: a PID recycled by another program after ours died
 * does not keep a ledger row, a lock or a temp file alive.
 */
export function snapshiftProcessIsAlive(pid: number): boolean {
  if (pid === process.pid) return true;
  if (!processIsAlive(pid)) return false;
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('node');
  } catch {
    return false;
  }
}
