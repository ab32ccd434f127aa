import { spawn } from 'node:child_process';
import { closeSync, openSync, promises as fs } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { SnapshiftError } from '../../core/errors.ts';
import { readCmdline, sleep, type OwnedProcess } from '../../core/owned-process.ts';

export interface DetachedServerOptions {
  vmName: string;
  pointId: string;
  repository: string;
  /** The unix socket it serves every disk on (one export per disk, named after it). */
  socketPath: string;
  /** Folder for its output: serve.json (where it serves, once ready) and serve.log (its stderr). */
  folder: string;
  /** Handed to it in its environment (SNAPSHIFT_PASSWORD), never on its command line. */
  password?: string;
  readyTimeoutMs?: number;
  /** Hears the process as soon as it exists (before it serves), to record it where a later cleanup finds it. */
  onSpawned?: (server: OwnedProcess & { socketPath: string }) => Promise<void>;
}

const projectRoot = resolve(fileURLToPath(new URL('../../..', import.meta.url)));
const entry = fileURLToPath(new URL('./serve-entry.ts', import.meta.url));

/**
 * Starts the equivalent of `snapshift serve` (serve-entry.ts) as a process of its own (its own session, no pipes to us), so the restore point
 * stays served after the command that started it returns, and a VM reading it never depends on that
 * command. It exits by itself once its clients are gone (the VM powered off, or was migrated), so it never
 * holds the repository's lock for a VM that no longer runs. Returns once it serves, or fails with what it said.
 */
export async function startDetachedServer(options: DetachedServerOptions): Promise<OwnedProcess & { socketPath: string }> {
  const readyFile = join(options.folder, 'serve.json');
  const logFile = join(options.folder, 'serve.log');
  await fs.rm(readyFile, { force: true });
  // tsx is resolved from the project's root (its cwd), as bin/snapshift resolves it.
  const args = ['--import', 'tsx', entry, options.vmName, '--point', options.pointId, '--repo', options.repository, '--socket', options.socketPath];
  const stdout = openSync(readyFile, 'w');
  const stderr = openSync(logFile, 'a');
  let pid: number;
  try {
    const env = { ...process.env, ...(options.password !== undefined ? { SNAPSHIFT_PASSWORD: options.password } : {}) };
    const child = spawn(process.execPath, args, { detached: true, stdio: ['ignore', stdout, stderr], env, cwd: projectRoot });
    pid = await new Promise<number>((resolveSpawn, reject) => {
      child.once('spawn', () => resolveSpawn(child.pid!));
      child.once('error', reject);
    });
    child.unref();
  } finally {
    closeSync(stdout);
    closeSync(stderr);
  }
  const cmdline = (await readCmdline(pid)) ?? [process.execPath, ...args];
  const server = { label: `nbd-server:${options.vmName}`, pid, cmdline, socketPath: options.socketPath };
  await options.onSpawned?.(server);
  const deadline = Date.now() + (options.readyTimeoutMs ?? 60_000);
  for (;;) {
    const ready = await fs.readFile(readyFile, 'utf8').catch(() => '');
    if (ready.trimEnd().endsWith('}')) {
      try {
        JSON.parse(ready);
        return server;
      } catch {
        // Not complete yet.
      }
    }
    if ((await readCmdline(pid)) === undefined) {
      const said = (await fs.readFile(logFile, 'utf8').catch(() => '')).trim().split('\n').slice(-2).join(' ');
      throw new SnapshiftError('INSTANT_RECOVERY_SERVER_FAILED', `the NBD server for ${options.vmName} exited before serving: ${said || 'it said nothing'} (log: ${logFile})`);
    }
    if (Date.now() > deadline) {
      process.kill(pid, 'SIGTERM');
      throw new SnapshiftError('INSTANT_RECOVERY_SERVER_FAILED', `the NBD server for ${options.vmName} did not serve within ${options.readyTimeoutMs ?? 60_000} ms (log: ${logFile})`);
    }
    await sleep(50);
  }
}
