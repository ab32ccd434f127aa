import { readFile } from 'node:fs/promises';
import { SnapshiftError, messageOf, type ErrorCode } from '../../core/errors.ts';
import { exec, type ExecResult } from '../../core/exec.ts';

/** One line of /proc/self/mountinfo that matters here. */
export interface MountEntry {
  mountPoint: string;
  fsType: string;
  source: string;
}

/** Mounts of this mount namespace (proc(5): mountinfo; the mount point is field 5, octal-escaped). */
export async function readMounts(): Promise<MountEntry[]> {
  const text = await readFile('/proc/self/mountinfo', 'utf8');
  const mounts: MountEntry[] = [];
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const [before, after = ''] = line.split(' - ');
    const fields = before!.split(' ');
    const [fsType = '', source = ''] = after.split(' ');
    mounts.push({ mountPoint: unescapeMountField(fields[4] ?? ''), fsType, source: unescapeMountField(source) });
  }
  return mounts;
}

function unescapeMountField(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

/** Loop devices and the files behind them (`losetup --json`; empty output when there are none). */
export async function readLoopDevices(): Promise<Array<{ device: string; backingFile: string }>> {
  const { stdout } = await exec('losetup', ['--list', '--json', '--output', 'NAME,BACK-FILE']);
  if (stdout.trim() === '') return [];
  const parsed = JSON.parse(stdout) as { loopdevices?: Array<{ name?: unknown; 'back-file'?: unknown }> };
  return (parsed.loopdevices ?? []).flatMap((entry) =>
    typeof entry.name === 'string' ? [{ device: entry.name, backingFile: typeof entry['back-file'] === 'string' ? entry['back-file'].replace(/ \(deleted\)$/, '') : '' }] : [],
  );
}

/**
 * Runs a program that must not outlive us: `setpriv --pdeathsig KILL` makes the kernel end it when this
 * process dies, even by SIGKILL, so a `cp` or `find` never keeps a leftover mount busy for the next run.
 */
export async function execTied(
  program: string,
  args: readonly string[],
  options: { code: ErrorCode; signal?: AbortSignal; timeoutMs?: number },
): Promise<ExecResult> {
  try {
    return await exec('setpriv', ['--pdeathsig', 'KILL', '--', program, ...args], { timeoutMs: options.timeoutMs ?? 24 * 3600_000, code: options.code, signal: options.signal });
  } catch (error) {
    if (options.signal?.aborted) throw error;
    const message = messageOf(error).replace(/^setpriv --pdeathsig KILL -- /, '');
    throw new SnapshiftError(error instanceof SnapshiftError ? error.code : options.code, message, { cause: error });
  }
}

/**
 * Unmounts, retrying while the kernel says busy: a loop device just detached, or a `cp` just ended, lets go of
 * its mount a moment later.
 */
export async function unmount(mountPoint: string, code: ErrorCode, patienceMs = 5_000): Promise<void> {
  const deadline = Date.now() + patienceMs;
  for (;;) {
    try {
      await exec('umount', [mountPoint], { timeoutMs: 60_000, code });
      return;
    } catch (error) {
      if (!/busy/i.test(messageOf(error)) || Date.now() >= deadline) throw error;
      await sleep(100);
    }
  }
}

/** Detaches a loop device, retrying while it is busy (its filesystem's unmount may still be releasing it). */
export async function detachLoop(device: string, code: ErrorCode, patienceMs = 5_000): Promise<void> {
  const deadline = Date.now() + patienceMs;
  for (;;) {
    try {
      await exec('losetup', ['--detach', device], { timeoutMs: 60_000, code });
      return;
    } catch (error) {
      if (!/busy/i.test(messageOf(error)) || Date.now() >= deadline) throw error;
      await sleep(100);
    }
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
