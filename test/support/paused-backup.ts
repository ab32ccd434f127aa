import { spawn, type ChildProcess } from 'node:child_process';

export interface PausedBackupOptions {
  home: string;
  repo: string;
  mode: 'regular' | 'storage-snapshot';
  /** Where the child stops (see backup-child.ts): vm-snapshot | storage-snapshot | copy. */
  pauseAt: 'vm-snapshot' | 'storage-snapshot' | 'copy';
  vmNames: string[];
  env: Record<string, string | undefined>;
}

/**
 * Starts a backup in a child process (test/support/backup-child.ts) and resolves once it reached its
 * pause point; the test then kills it to leave the debris a crash leaves. The caller owns the child.
 */
export async function startPausedBackup(options: PausedBackupOptions): Promise<ChildProcess> {
  const child = spawn('node', ['--import', 'tsx', 'test/support/backup-child.ts', options.home, options.repo, options.mode, options.pauseAt, ...options.vmNames], {
    env: { ...process.env, ...options.env },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const marker = options.pauseAt === 'copy' ? 'COPYING' : 'PAUSED';
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', (chunk: Buffer) => chunk.toString().includes(marker) && resolve());
    child.on('exit', (code) => reject(new Error(`backup child exited (${code}) before reaching ${options.pauseAt}`)));
  });
  return child;
}

/** SIGKILL by PID, then wait until the process is gone. */
export async function sigkill(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGKILL');
  await exited;
}
